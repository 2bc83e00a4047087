"""The one-time private key is never stored or shown in clear, even while a
grab runs for a while and when it is retried.

A real redis-server and a real ``bakgrab worker`` (debug log, rsync limited
to 200 KB/s so a grab of ~3 MB takes seconds, rsync timeout 3 s so a frozen
client makes it retry) serve the module. Everything that holds or shows task
arguments is read while the grab runs and after it: every Redis key by type
(queue lists, the ``unacked`` hash and ``unacked_index``, kombu bindings,
result keys) with kombu's base64 message bodies decoded, ``celery inspect
active``/``reserved``, the task events, the worker's log. None holds any
text of an OpenSSH private key (support.KEY_MARKERS); the task message in
Redis holds the sealed form instead.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from bakgrab.tasks import GRAB, sealed
from tests import support

pytestmark = pytest.mark.integration

SETTINGS = {"bwlimit": "200K", "rsync_timeout": "3", "connect_timeout": "3",
            "server_alive_interval": "2", "retry_backoff": "0.3", "retry_backoff_max": "1"}


@dataclass
class Backup:
    base: Path
    storage: Path
    url: str
    worker: support.Proc
    redis: redis.Redis
    hostname: str


@pytest.fixture(scope="module")
def backup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backup]:
    base = tmp_path_factory.mktemp("secrecy")
    redis_proc, url = support.start_redis(base / "redis")
    storage = base / "storage"
    worker = None
    try:
        worker = support.start_worker(storage, url, base / "worker.log", "--loglevel", "DEBUG",
                                      "--concurrency", "1", env=support.worker_env(**SETTINGS))
        yield Backup(base, storage, url, worker, redis.Redis.from_url(url),
                     f"bakgrab.bakgrab@{socket.gethostname()}")
    finally:
        if worker is not None:
            worker.stop()
        redis_proc.stop()


def make_source(path: Path, files: int, size: int) -> Path:
    path.mkdir(parents=True)
    for i in range(files):
        (path / f"f{i:03d}").write_bytes(os.urandom(size))
    return path


@contextlib.contextmanager
def client(b: Backup, name: str, src: Path) -> Iterator[subprocess.Popen[str]]:
    """A real `bakgrab --debug backup` running in the background, killed by pid
    if the test ends before it does."""
    proc = subprocess.Popen(
        [support.BAKGRAB, "--debug", "backup", "--broker", b.url, "--name", name, "--source", str(src),
         "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def rsync_pids(b: Backup) -> list[int]:
    return [p for p in support.descendants(b.worker.pid) if support.comm(p) == "rsync"]


def wait_pulling(b: Backup, name: str, min_files: int = 2) -> None:
    """Until the worker's rsync runs and has written some files."""
    inprogress = b.storage / ".bakgrab" / "inprogress" / name
    support.wait_for(lambda: rsync_pids(b) and inprogress.is_dir()
                     and len(list(inprogress.glob("f*"))) >= min_files,
                     60, "the pull to be under way", interval=0.05)


def decode(value: bytes) -> tuple[str, list[dict[str, Any]]]:
    """A stored value as text with every kombu message body decoded, and the
    messages found in it."""
    text = value.decode(errors="replace")
    messages: list[dict[str, Any]] = []
    try:
        data = json.loads(text)
    except ValueError:
        return text, messages

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "body" in node and isinstance(node.get("headers"), dict):
                body = node["body"]
                if node.get("properties", {}).get("body_encoding") == "base64":
                    body = base64.b64decode(body).decode(errors="replace")
                messages.append({**node, "body": body})
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(data)
    return text + "".join(m["body"] for m in messages), messages


def raw(value: Any) -> bytes:
    """A reply of redis-py (bytes, or a number for a zset score) as bytes."""
    return value if isinstance(value, bytes) else str(value).encode()


def dump_redis(r: redis.Redis) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Every key of the broker/backend database, its value(s) by type, decoded."""
    dumped: dict[str, str] = {}
    messages: list[dict[str, Any]] = []
    for key in r.scan_iter(count=1000):
        kind = raw(r.type(key)).decode()
        # (label, stored value) pairs: a hash field or a zset score is a label.
        pairs: list[tuple[Any, Any]]
        if kind == "string":
            pairs = [(b"", r.get(key) or b"")]
        elif kind == "list":
            pairs = [(b"", v) for v in r.lrange(key, 0, -1)]
        elif kind == "hash":
            pairs = list(r.hgetall(key).items())
        elif kind == "set":
            pairs = [(b"", v) for v in r.smembers(key)]
        elif kind == "zset":
            scored: list[Any] = list(r.zrange(key, 0, -1, withscores=True))
            pairs = [(score, member) for member, score in scored]
        elif kind == "none":  # gone between SCAN and TYPE
            continue
        else:
            raise AssertionError(f"unexpected Redis type {kind} of {key!r}")
        texts = []
        for label, value in pairs:
            text, found = decode(raw(value))
            texts.append(raw(label).decode(errors="replace") + " " + text)
            messages += found
        dumped[raw(key).decode(errors="replace")] = "\n".join(texts)
    return dumped, messages


def process_texts(*roots: int) -> list[str]:
    """The argv and environment of ``roots`` and every process below them (what
    `ps e` shows anyone on the host)."""
    texts = []
    for pid in {*roots, *(p for root in roots for p in support.descendants(root))}:
        for part in ("cmdline", "environ"):
            with contextlib.suppress(OSError):
                texts.append(Path(f"/proc/{pid}/{part}").read_bytes().decode(errors="replace"))
    return texts


def grab_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["headers"].get("task") == GRAB]


def assert_no_key(text: str) -> None:
    for marker in support.KEY_MARKERS:
        assert marker not in text


def test_key_is_only_ever_sealed_during_and_after_a_slow_grab(backup: Backup,
                                                             tmp_path: Path) -> None:
    """While a slow grab runs, its task message sits in Redis's unacked hash
    with the key sealed ("bakgrab-sealed-v1:"), and no Redis key or value, no
    `inspect active`/`reserved` reply, no argv or environment of the worker's
    or the client's processes holds a private key; after it ends, neither
    Redis (result included) nor the worker's debug log nor the client's debug
    output does, and the key file on the worker is gone."""
    src = make_source(tmp_path / "src", files=12, size=256_000)  # ~3 MB: ~15 s at 200 KB/s
    offset = backup.worker.log.stat().st_size
    app = Celery(broker=backup.url)
    try:
        with client(backup, "slow", src) as proc:
            wait_pulling(backup, "slow")
            during, messages = dump_redis(backup.redis)
            assert {"unacked", "unacked_index", "_kombu.binding.bakgrab"} <= set(during)
            grabs = grab_messages(messages)
            assert grabs, during
            for message in grabs:
                assert sealed.PREFIX in message["body"]
            task_id = grabs[0]["headers"]["id"]
            inspect = app.control.inspect(timeout=3, destination=[backup.hostname])
            active = inspect.active()
            reserved = inspect.reserved()
            assert active is not None and reserved is not None
            running = active[backup.hostname]
            assert [t["id"] for t in running] == [task_id]
            assert running[0]["kwargs"]["key"].startswith(sealed.PREFIX)
            processes = process_texts(backup.worker.pid, proc.pid)
            assert any("rsync" in t for t in processes)
            assert rsync_pids(backup), "the grab ended before everything was read"
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err + backup.worker.text()[-3000:]
    finally:
        app.close()
    assert json.loads(out)["snapshot"].startswith("slow.")
    after, _ = dump_redis(backup.redis)
    assert f"celery-task-meta-{task_id}" in after
    log = backup.worker.text()[offset:]
    assert "run: " in log  # the debug log was on and shows the rsync it ran
    for text in (*during.values(), json.dumps(active), json.dumps(reserved), *processes,
                 *after.values(), log, out, err):
        assert_no_key(text)
    assert list((backup.storage / ".bakgrab" / "run").glob("*/key")) == []


class Events:
    """Every Celery event on the broker, captured by a real Receiver thread."""

    def __init__(self, url: str) -> None:
        self.app = Celery(broker=url)
        self.events: list[dict[str, Any]] = []
        self.ready = threading.Event()
        self.receiver: Any = None
        self.thread = threading.Thread(target=self._capture, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _capture(self) -> None:
        with self.app.connection() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"*": self.events.append})
            self.ready.set()
            with contextlib.suppress(Exception):  # ends by should_stop or a closed connection
                self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def of(self, *kinds: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] in kinds]

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(10)
        self.app.close()


def retried_message(b: Backup) -> dict[str, Any] | None:
    for value in b.redis.hvals("unacked"):
        for message in grab_messages(decode(raw(value))[1]):
            if message["headers"].get("retries", 0) >= 1:
                return message
    return None


def test_retried_grab_keeps_the_key_redacted(backup: Backup, tmp_path: Path) -> None:
    """A grab whose first attempt times out (the client's sshd frozen) is
    retried: the retried task message in Redis still carries the redacted
    kwargsrepr and the sealed key, and every task-sent, task-received and
    task-retried event (first attempt and retry) shows only the redacted
    arguments, never a private key nor even its sealed form."""
    src = make_source(tmp_path / "src", files=24, size=100_000)
    offset = backup.worker.log.stat().st_size
    events = Events(backup.url)
    frozen: list[int] = []
    try:
        with client(backup, "retried", src) as proc:
            wait_pulling(backup, "retried")
            frozen = [p for p in support.descendants(proc.pid)
                      if support.comm(p) in ("sshd", "rsync")]
            assert frozen
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            message = support.wait_for(lambda: retried_message(backup), 60,
                                       "the retried task message", interval=0.05)
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err + backup.worker.text()[-3000:]
        support.wait_for(lambda: events.of("task-succeeded"), 20, "the task-succeeded event")
    finally:
        events.stop()
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert json.loads(out)["attempts"] >= 2
    assert "retry 1/" in backup.worker.text()[offset:]

    headers = message["headers"]
    assert headers["argsrepr"] == "()"
    assert "<redacted>" in headers["kwargsrepr"]
    assert sealed.PREFIX not in headers["kwargsrepr"]
    assert sealed.PREFIX in message["body"]
    assert_no_key(json.dumps(message))

    shown = events.of("task-sent", "task-received")
    assert len(events.of("task-sent")) >= 1  # the retry's: clients send none (issue 11)
    assert len(events.of("task-received")) >= 2  # first attempt and retry
    assert events.of("task-retried")
    for event in shown:
        assert event["args"] == "()"
        assert "<redacted>" in event["kwargs"]
    blob = json.dumps(events.events, default=str)
    assert sealed.PREFIX not in blob
    assert_no_key(blob)
    assert_no_key(backup.worker.text()[offset:] + out + err)
    after, _ = dump_redis(backup.redis)
    for text in after.values():
        assert_no_key(text)
