"""Hand-made broker items, as anyone holding a client's Redis credential can push (issue 11).

A real redis-server and a real ``bakgrab worker`` serve the module. Each item
is pushed with a raw ``LPUSH`` onto the queue, in kombu's Redis message format
(what Celery's ``send_task`` pushes; :func:`envelope` builds it and the probe
shows that the worker takes it when nothing is wrong with it). A refused item
must be dropped: gone from the queue and never in the unacked hash, logged in
one line without its content, no result stored under its id, nothing written
to the storage; and the worker stays alive and still serves the next request
(the probe: a request that reaches the task body and comes back as its
expected InvalidRequest). Attacks 2, 5, 6 and 7 of issue 11.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import re
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bakgrab.client import keys
from bakgrab.tasks import GRAB, RESTORE, request, sealed
from bakgrab.worker import transport
from tests import support

pytestmark = pytest.mark.integration

QUEUE = "bakgrab"
JOB_TIME_LIMIT = 8
MARKER = "MARKER-" + secrets.token_hex(6)
"""Put in every hostile item: the worker's log must never show it."""
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


@dataclass
class Ctx:
    base: Path
    storage: Path
    url: str
    worker: support.Proc
    redis: redis.Redis
    app: Celery

    def log_size(self) -> int:
        return self.worker.log.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.worker.log, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def listing(self) -> dict[str, tuple[object, ...]]:
        """The storage, path by path with metadata and content (issue 13)."""
        return support.tree_state(self.storage)

    def result_key(self, task_id: str) -> bytes | None:
        return self.redis.get(f"celery-task-meta-{task_id}")  # type: ignore[return-value]

    def mac_key(self) -> bytes:
        return transport.mac_key(sealed.load_or_create_private(
            self.storage / ".bakgrab" / "request.key"))


def start(base: Path, **settings: str) -> tuple[support.Proc, str, support.Proc]:
    redis_proc, url = support.start_redis(base / "redis")
    try:
        worker = support.start_worker(base / "storage", url, base / "worker.log",
                                      env=support.worker_env(**settings))
    except BaseException:
        redis_proc.stop()
        raise
    return redis_proc, url, worker


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    base = tmp_path_factory.mktemp("messages")
    # No retries (a request that got through fails at once); a short job time
    # limit and a long connect timeout for the time-limit test; first-use
    # enrolment so that a signed request of a new name reaches ssh.
    redis_proc, url, worker = start(base, max_retries="0", job_time_limit=str(JOB_TIME_LIMIT),
                                    connect_timeout="60", enrol="first-use")
    app = Celery(broker=url, backend=url)
    try:
        yield Ctx(base, base / "storage", url, worker, redis.Redis.from_url(url), app)
    finally:
        app.close()
        worker.stop()
        redis_proc.stop()


def envelope(task: str = GRAB, kwargs: Any = None, args: Any = (), task_id: str | None = None,
             embed: Any = None, body: Any = None, **headers: Any) -> dict[str, Any]:
    """What Celery 5's send_task LPUSHes (protocol 2), from the sender's side."""
    task_id = task_id or str(uuid.uuid4())
    if body is None:
        data = [list(args), {"v": 1, "name": "probe", "x": MARKER} if kwargs is None else kwargs,
                EMBED if embed is None else embed]
        body = b64(json.dumps(data))
    head: dict[str, Any] = {
        "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None,
        "expires": None, "group": None, "group_index": None, "retries": 0,
        "timelimit": [None, None], "root_id": task_id, "parent_id": None,
        "argsrepr": "()", "kwargsrepr": "{}", "origin": "gen1@attacker",
        "ignore_result": False, "replaced_task_nesting": 0, "stamped_headers": None,
        "stamps": {}}
    head.update(headers)
    return {"body": body, "content-encoding": "utf-8", "content-type": "application/json",
            "headers": head,
            "properties": {"correlation_id": task_id, "reply_to": str(uuid.uuid4()),
                           "delivery_mode": 2,
                           "delivery_info": {"exchange": "", "routing_key": QUEUE},
                           "priority": 0, "body_encoding": "base64",
                           "delivery_tag": str(uuid.uuid4())}}


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def raw(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


def push(ctx: Ctx, item: bytes) -> None:
    ctx.redis.lpush(QUEUE, item)


def gone(ctx: Ctx) -> bool:
    return ctx.redis.llen(QUEUE) == 0 and ctx.redis.hlen("unacked") == 0


def probe(ctx: Ctx) -> None:
    """The worker still serves: a plain valid-shaped request reaches the task
    body and comes back as its expected InvalidRequest."""
    message = envelope(kwargs={"v": 1, "name": "probe"})
    push(ctx, raw(message))
    result = AsyncResult(message["headers"]["id"], app=ctx.app)
    value = result.get(timeout=30, propagate=False)
    assert result.state == "FAILURE", (result.state, value)
    assert type(value).__name__ == "InvalidRequest", repr(value)
    assert str(value).startswith("request:")


def assert_dropped(ctx: Ctx, item: bytes, reason: str, task_id: str | None = None,
                   settle: float = 0.0) -> str:
    """``item`` is dropped with ``reason``; nothing follows from it; the
    worker keeps serving. The log lines about it."""
    listing = ctx.listing()
    offset = ctx.log_size()
    push(ctx, item)
    line = support.wait_for(
        lambda: re.search(r"dropped a message from queue bakgrab.*", ctx.log_since(offset)),
        20, "the drop to be logged").group(0)
    assert reason in line, line
    support.wait_for(lambda: gone(ctx), 10, "the item to be gone")
    time.sleep(settle)
    assert gone(ctx), "the item came back (a retry or a redelivery)"
    if task_id is not None:
        assert ctx.result_key(task_id) is None
        assert task_id not in ctx.log_since(offset).replace(line, "")
    text = ctx.log_since(offset)
    assert MARKER not in text
    # (a probe's InvalidRequest may log its traceback here: the task body's)
    assert "Unrecoverable" not in text and "MainProcess] Traceback" not in text
    assert ctx.worker.alive()
    probe(ctx)
    assert ctx.listing() == listing
    return text


def test_probe_is_served(ctx: Ctx) -> None:
    """A hand-made item with nothing wrong in it is taken: the refusals below
    are of what each one changes."""
    probe(ctx)


def with_headers(**headers: Any) -> bytes:
    return raw(envelope(**headers))


def replaced(**fields: Any) -> bytes:
    message = envelope()
    message.update(fields)
    return raw(message)


def in_properties(**fields: Any) -> bytes:
    message = envelope()
    message["properties"].update(fields)
    return raw(message)


def body_of(data: Any) -> bytes:
    return raw(envelope(body=b64(json.dumps(data))))


MALFORMED: dict[str, tuple[Callable[[], bytes], str]] = {
    "not-json": (lambda: b"not json " + MARKER.encode(), "not a JSON message"),
    "list": (lambda: b"[]", "not a task message envelope"),
    "empty-object": (lambda: b"{}", "not a task message envelope"),
    "null": (lambda: b"null", "not a task message envelope"),
    "number": (lambda: b"5", "not a task message envelope"),
    "string": (lambda: json.dumps(MARKER).encode(), "not a task message envelope"),
    "bad-utf8": (lambda: b'{"body": "\xff\xfe"}', "not a JSON message"),
    "deep": (lambda: b"[" * 200_000 + b"]" * 200_000, "not a JSON message"),
    "extra-key": (lambda: replaced(extra=MARKER), "not a task message envelope"),
    "headers-list": (lambda: replaced(headers=[MARKER]), "headers: not a mapping"),
    "properties-str": (lambda: replaced(properties=MARKER), "body_encoding must be base64"),
    "body-number": (lambda: replaced(body=5), "body: not base64 text"),
    "bad-base64": (lambda: replaced(body="!!" + MARKER), "body: not base64 of JSON"),
    "base64-not-json": (lambda: replaced(body=b64(b"\x80\x81" + MARKER.encode())),
                        "body: not base64 of JSON"),
    "body-mapping": (lambda: body_of({"x": MARKER}), "body: not [args, kwargs, embed]"),
    "body-4-list": (lambda: body_of([[], {}, EMBED, MARKER]), "body: not [args, kwargs, embed]"),
    "args-mapping": (lambda: body_of([{"x": MARKER}, {}, EMBED]), "body: args is not a list"),
    "kwargs-list": (lambda: body_of([[], [["v", 1], ["x", MARKER]], EMBED]),
                    "body: kwargs is not a mapping"),
    "embed-list": (lambda: body_of([[], {}, [MARKER]]), "callbacks, errbacks"),
    "typed-value": (lambda: body_of([[], {"v": {"__type__": "bytes", "__value__": MARKER}},
                                     EMBED]), "typed value"),
    "deep-kwargs": (lambda: body_of([[], {"v": [[[[[[[[[[MARKER]]]]]]]]]]}, EMBED]),
                    "too deeply nested"),
    "pickle": (lambda: replaced(**{"content-type": "application/x-python-serialize"}),
               "content type is not application/json"),
    "yaml": (lambda: replaced(**{"content-type": "application/x-yaml"}),
             "content type is not application/json"),
    "binary": (lambda: replaced(**{"content-encoding": "binary"}),
               "content encoding is not utf-8"),
    "body-encoding": (lambda: in_properties(body_encoding="plain"),
                      "body_encoding must be base64"),
    "protocol-1": (lambda: raw({**envelope(), "headers": {},
                                "body": b64(json.dumps({"task": GRAB, "id": "x",
                                                        "kwargs": {"x": MARKER}}))}),
                   "protocol 1"),
    "task-number": (lambda: with_headers(task=5), "no task name or id"),
    "no-id": (lambda: with_headers(id=None), "no task name or id"),
    "long-id": (lambda: with_headers(id="x" * 2000), "task id of 1-1024"),
    "retries-text": (lambda: with_headers(retries="1"), "retries must be a whole number"),
    "retries-bool": (lambda: with_headers(retries=True), "retries must be a whole number"),
    "retries-negative": (lambda: with_headers(retries=-1), "retries must be a whole number"),
    "eta-garbage": (lambda: with_headers(eta=MARKER), "eta is not a time"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_item_is_dropped(ctx: Ctx, case: str) -> None:
    """Attack 2: each malformed item (which kombu or Celery would have raised
    on in the worker's main process, stopping it with exit 0) is dropped and
    logged once without its content; the worker keeps serving."""
    make, reason = MALFORMED[case]
    assert_dropped(ctx, make(), reason)


@pytest.mark.parametrize("size", [2 << 20, 24 << 20], ids=["2MiB", "24MiB"])
def test_item_over_max_message_bytes_is_dropped_unread(ctx: Ctx, size: int) -> None:
    """An item over max_message_bytes (1 MiB) is dropped before decoding,
    however well-formed it is otherwise."""
    message = envelope(kwargs={"v": 1, "name": "big", "excludes": [MARKER] * (size // 20)})
    item = raw(message)
    assert len(item) > size
    assert_dropped(ctx, item, "larger than max_message_bytes=1048576", message["headers"]["id"])


def test_largest_valid_request_is_taken(ctx: Ctx) -> None:
    """The largest excludes list a request may carry (256 KiB as JSON, of the
    characters that escape worst), with a sealed key of the longest form, fits
    under the default max_message_bytes and reaches the task body; one
    pattern more is refused by the request check, on the client already."""
    pattern = "\U0001f600" * 340  # 12 bytes each in JSON: 4082 bytes a pattern
    count = request.MAX_LIST_BYTES // (len(json.dumps(pattern)) + 2)
    excludes = [pattern] * count
    assert request.check_excludes(excludes)
    with pytest.raises(request.InvalidRequest, match="excludes: at most 256 KiB"):
        request.check_excludes([*excludes, pattern])
    kwargs = {"v": 1, "name": "largest", "address": "a" * 253, "port": 1, "user": "u" * 32,
              "key": sealed.PREFIX + "A" * (sealed.MAX_SEALED - len(sealed.PREFIX)),
              "host_key": "ssh-ed25519 " + "A" * 68, "excludes": excludes, "ts": 1,
              "sig": "A" * 86 + "=="}
    message = envelope(kwargs=kwargs)
    item = raw(message)
    assert 300 << 10 < len(item) < 1 << 20, len(item)
    offset = ctx.log_size()
    push(ctx, item)
    result = AsyncResult(message["headers"]["id"], app=ctx.app)
    value = result.get(timeout=30, propagate=False)
    assert type(value).__name__ == "InvalidRequest", repr(value)
    assert "dropped a message" not in ctx.log_since(offset)


BUILTINS: dict[str, list[Any]] = {
    "celery.chord_unlock": [str(uuid.uuid4()), [[str(uuid.uuid4()), None], None]],
    "celery.accumulate": [MARKER, 1, 2],
    "celery.backend_cleanup": [],
    "celery.chain": [],
    "celery.group": [[], None],
    "celery.chord": [[], None],
    "celery.map": [{"task": "celery.accumulate"}, [[MARKER]]],
    "celery.starmap": [{"task": "celery.accumulate"}, [[MARKER]]],
    "celery.chunks": [{"task": "celery.accumulate"}, [[MARKER]], 1],
    "os.system": ["touch /tmp/pwned-" + MARKER],
}


@pytest.mark.parametrize("task", list(BUILTINS))
def test_only_bakgrab_tasks_run(ctx: Ctx, task: str) -> None:
    """Attack 7: Celery's built-in tasks (and any other name) are dropped
    without running: no result is stored under the id the sender chose (as
    celery.accumulate would), nothing comes back to the queue (as
    celery.chord_unlock's retries would, every second)."""
    message = envelope(task=task, args=BUILTINS[task], kwargs={})
    assert_dropped(ctx, raw(message), "is not run for clients", message["headers"]["id"],
                   settle=2.5)
    assert not Path(f"/tmp/pwned-{MARKER}").exists()


def test_links_and_chords_on_a_grab_are_dropped(ctx: Ctx) -> None:
    """A bakgrab.grab item carrying a callback, an errback, a chain or a chord
    (which would make the worker send further tasks) is dropped."""
    link: dict[str, Any] = {"task": "celery.accumulate", "args": [MARKER], "kwargs": {},
                            "options": {}, "subtask_type": None, "immutable": False}
    for key in ("callbacks", "errbacks", "chain"):
        message = envelope(embed={**EMBED, key: [link]})
        assert_dropped(ctx, raw(message), "are not run for clients", message["headers"]["id"])
    message = envelope(embed={**EMBED, "chord": link})
    assert_dropped(ctx, raw(message), "are not run for clients", message["headers"]["id"])


def future(seconds: float) -> str:
    return (datetime.datetime.now(datetime.UTC)
            + datetime.timedelta(seconds=seconds)).isoformat()


def test_forged_schedules_and_retries_are_dropped(ctx: Ctx) -> None:
    """Attacks 5 and 6: an eta (a day ahead, or a second ahead: what
    countdown= sends), a first delivery claiming retries > 0, a forged MAC and
    the worker's real MAC moved onto another body are all dropped at once:
    nothing is held, nothing runs later."""
    key = ctx.mac_key()
    cases = [envelope(eta=future(86400)), envelope(eta=future(1)), envelope(retries=3),
             envelope(retries=1, eta=future(1), bakgrab_mac="0" * 64)]
    signed = envelope(retries=1, eta=future(1))
    h = signed["headers"]
    h["bakgrab_mac"] = transport.mac(key, GRAB, h["id"], 1, h["eta"], [],
                                     {"v": 1, "name": "other-body"})
    cases.append(signed)
    for message in cases:
        assert_dropped(ctx, raw(message), "not made by this worker", message["headers"]["id"])
    time.sleep(1.5)  # past every short eta: none of them runs after all
    for message in cases:
        assert ctx.result_key(message["headers"]["id"]) is None


def test_the_workers_own_signed_retry_is_taken(ctx: Ctx) -> None:
    """An item MACed with the key derived from the worker's request key (what
    the worker's own task.retry() publishes, see sign_publish) is taken, eta
    and retry count included, and runs when due."""
    message = envelope(kwargs={"v": 1, "name": "retried"}, retries=2, eta=future(1))
    h = message["headers"]
    h["bakgrab_mac"] = transport.mac(ctx.mac_key(), GRAB, h["id"], 2, h["eta"], [],
                                     {"v": 1, "name": "retried"})
    offset = ctx.log_size()
    push(ctx, raw(message))
    value = AsyncResult(h["id"], app=ctx.app).get(timeout=30, propagate=False)
    assert type(value).__name__ == "InvalidRequest", repr(value)
    assert "dropped a message" not in ctx.log_since(offset)


def test_client_time_limits_are_ignored(ctx: Ctx) -> None:
    """Attack 5: the worker's job_time_limit applies whatever timelimit the
    message names. Two grabs connect to a port that accepts but never speaks
    (ssh hangs in its handshake): one whose message asks for 1 s and one for
    an hour both run until job_time_limit and stop there."""
    private = sealed.load_or_create_private(ctx.storage / ".bakgrab" / "request.key")
    # as a real client does before it sends: wait for the result (subscribed),
    # or the worker cancels a job nobody waits for (cancel_unwatched, issue 13)
    waiting = ctx.redis.pubsub()
    with socket.socket() as silent, contextlib.closing(waiting):
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        ids = {}
        started = time.monotonic()
        for name, limits in (("tl-short", [1, 0.5]), ("tl-long", [3600, 3500])):
            task_id = str(uuid.uuid4())
            waiting.subscribe(f"celery-task-meta-{task_id}")
            identity = Ed25519PrivateKey.generate()
            fields = {"v": 1, "name": name, "address": "127.0.0.1", "port": port,
                      "user": "root",
                      "key": sealed.seal(private.public_key(),
                                         keys.one_time_key().private.encode()),
                      "host_key": keys.public_line(identity), "excludes": []}
            kwargs = request.sign(fields, GRAB, task_id, identity)
            push(ctx, raw(envelope(kwargs=kwargs, task_id=task_id, timelimit=limits,
                                   expires=future(-60))))
            ids[name] = task_id
        ended = {}
        outcome = {}
        for name, task_id in ids.items():
            value = AsyncResult(task_id, app=ctx.app).get(timeout=JOB_TIME_LIMIT + 30,
                                                          propagate=False)
            ended[name] = time.monotonic() - started
            outcome[name] = value
    for name in ids:
        assert type(outcome[name]).__name__ == "JobTimeout", (name, repr(outcome[name]))
        assert f"job_time_limit={JOB_TIME_LIMIT}" in str(outcome[name])
        # not at 0.5 s (the message's soft limit), not after an hour or ssh's 60 s
        assert JOB_TIME_LIMIT - 1 <= ended[name] <= JOB_TIME_LIMIT + 20, (name, ended)
    assert ctx.worker.alive()
    probe(ctx)


def test_kwargsrepr_is_the_workers(ctx: Ctx) -> None:
    """Events (Flower) show the request as the worker saw it: a forged
    kwargsrepr naming another backup is replaced; a field that fails its
    check is shown as <invalid>, never echoed."""
    events: list[dict[str, Any]] = []
    import threading

    ready = threading.Event()

    def capture() -> None:
        with ctx.app.connection() as conn:
            recv = ctx.app.events.Receiver(conn, handlers={"*": events.append})
            ready.set()
            try:
                recv.capture(limit=None, timeout=20, wakeup=True)
            except Exception:  # noqa: BLE001 -- the capture ends by its timeout
                return

    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    assert ready.wait(10)
    time.sleep(0.5)
    message = envelope(kwargs={"v": 1, "name": "shown", "user": "x y " + MARKER},
                       kwargsrepr="{'name': 'victim', 'note': 'forged'}",
                       argsrepr="('forged',)")
    task_id = message["headers"]["id"]
    push(ctx, raw(message))
    AsyncResult(task_id, app=ctx.app).get(timeout=30, propagate=False)
    received = support.wait_for(
        lambda: [e for e in events if e["type"] == "task-received" and e["uuid"] == task_id],
        20, "the task-received event")
    assert received[0]["kwargs"] == "{'name': 'shown', 'user': '<invalid>'}"
    assert received[0]["args"] == "()"
    assert MARKER not in json.dumps(events, default=str)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_eta_flood_is_not_held(tmp_path: Path) -> None:
    """Attack 6: 60 MiB of items with an eta a day ahead (issue 11 measured
    169 MiB of growth for 50 MiB) are dropped as they come: the worker's main
    process grows by a few MiB at most, none of them stays in Redis (queue or
    unacked hash) and none runs; drop lines are rate-limited; the worker
    still serves."""
    redis_proc, url, worker = start(tmp_path, max_retries="0")
    app = Celery(broker=url, backend=url)
    try:
        r = redis.Redis.from_url(url)
        c = Ctx(tmp_path, tmp_path / "storage", url, worker, r, app)
        probe(c)
        time.sleep(1)
        before = rss_kib(worker.pid)
        filler = ["x" * 1000] * 250  # about 250 KiB an item
        ids = []
        with r.pipeline() as pipe:
            for _ in range(240):
                message = envelope(kwargs={"v": 1, "name": "flood", "excludes": filler},
                                   eta=future(86400))
                ids.append(message["headers"]["id"])
                pipe.lpush(QUEUE, raw(message))
            pipe.execute()
        support.wait_for(lambda: gone(c), 120, "the flood to be dropped", interval=0.5)
        probe(c)
        grown = rss_kib(worker.pid) - before
        assert grown < 8 * 1024, f"the worker grew by {grown} KiB"
        assert all(r.get(f"celery-task-meta-{i}") is None for i in ids)
        lines = worker.text().count("dropped a message from queue")
        assert 0 < lines <= transport.DropLog().burst
        assert worker.alive()
    finally:
        app.close()
        worker.stop()
        redis_proc.stop()


def test_restore_is_admitted_too(ctx: Ctx) -> None:
    """bakgrab.restore is the other task a client may send: it is taken
    (its refusal comes from the task body)."""
    message = envelope(task=RESTORE, kwargs={"v": 1, "name": "probe"})
    push(ctx, raw(message))
    value = AsyncResult(message["headers"]["id"], app=ctx.app).get(timeout=30,
                                                                    propagate=False)
    assert type(value).__name__ == "InvalidRequest", repr(value)


def test_nothing_was_recorded_or_written(ctx: Ctx) -> None:
    """Nothing any item named was created (os.system's target, say), and no
    refused request added a failure to `bakgrab status` for its name (attack
    9): only the time-limited grabs, which reached ssh, failed for real."""
    assert not [p for p in Path("/tmp").glob(f"*{MARKER}*")]
    assert os.path.isdir(ctx.storage)
    failures = ctx.storage / ".bakgrab" / "failures"
    recorded = sorted(p.name for p in failures.iterdir()) if failures.is_dir() else []
    assert set(recorded) <= {"tl-short", "tl-long"}, recorded
