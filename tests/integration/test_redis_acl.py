"""The Redis users of a deployed backup host, against a real redis-server.

The backup host is installed by deploy/backup-host/install.sh (``--prefix``,
throwaway user names removed at the end), with two clients added by
add-client.sh; redis-server runs from the generated snippet and ACL file.
A client's credential may send a request and read results, and nothing
else: not another client's queued request (it holds that client's sealed
one-time key), not the request key's slot, not remote control, not admin
commands. The worker's and the client's credentials are enough for a real
`bakgrab worker` and a real `bakgrab backup`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from tests import support
from tests.conftest import need_root
from tests.integration import test_deploy as deploy

pytestmark = [pytest.mark.integration, pytest.mark.root]

QUEUE = "bakgrab"
SEP = b"\x06\x16"


@dataclass
class AclHost:
    host: deploy.Host
    alpha: deploy.Secret  # broker URLs with their passwords, masked in reprs
    beta: deploy.Secret
    tmp: Path = field(default=Path())

    @property
    def worker(self) -> deploy.Secret:
        return self.host.broker("worker.env")


@pytest.fixture(scope="module")
def acl_host() -> Iterator[AclHost]:
    need_root()
    suffix = secrets.token_hex(3)
    root = support.readable_tmp(Path("/tmp"))
    proc = None
    try:
        with deploy.removed_afterwards(f"bkw{suffix}", f"bkt{suffix}"):
            host = deploy.install_host(root / "host", suffix, support.free_port())
            keys = root / "keys"
            keys.mkdir()
            alpha = host.add_client("alpha", deploy.new_key(keys / "alpha"), "--no-reload")
            beta = host.add_client("beta", deploy.new_key(keys / "beta"), "--no-reload")
            proc = deploy.start_redis(host, root / "redis")
            yield AclHost(host, alpha, beta, root)
    finally:
        if proc is not None:
            proc.stop()
        shutil.rmtree(root, ignore_errors=True)


def command(url: str | None, port: int, *args: str | bytes) -> bytes:
    """The first line of Redis's answer to one command (after AUTH from
    ``url``), over a raw connection: SUBSCRIBE and MONITOR answer like any other."""
    def encode(parts: tuple[str | bytes, ...]) -> bytes:
        out = b"*%d\r\n" % len(parts)
        for part in parts:
            data = part if isinstance(part, bytes) else part.encode()
            out += b"$%d\r\n%s\r\n" % (len(data), data)
        return out

    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        f = s.makefile("rb")
        if url is not None:
            u = urllib.parse.urlsplit(url)
            s.sendall(encode(("AUTH", u.username or "", u.password or "")))
            assert f.readline() == b"+OK\r\n"
        s.sendall(encode(args))
        return f.readline().rstrip(b"\r\n")


def denied(reply: bytes) -> bool:
    return reply.startswith(b"-NOPERM")


NOPERM_REASONS = {
    b"-NOPERM this user has no permissions to run the ": "command",
    b"-NOPERM this user has no permissions to access one of the keys": "key",
    b"-NOPERM this user has no permissions to access one of the channels": "channel",
}
"""Redis 7's NOPERM replies, each with the reason its ACL LOG entry gives."""


def refused_by_acl(host: deploy.Host, url: str, *args: str | bytes) -> tuple[bytes, str]:
    """Send one command as ``url``'s user and return its reply and the reason
    Redis's ACL LOG gives for refusing it. Fails unless the reply is one of
    Redis's NOPERM replies and the log holds exactly that one denial, of this
    user, for the same reason (issue 13: a command refused for any other
    reason, an unknown command, a wrong type or arity, is not a denial)."""
    admin = host.admin()
    admin.acl_log_reset()
    reply = command(url, host.redis_port, *args)
    [reason] = [r for prefix, r in NOPERM_REASONS.items() if reply.startswith(prefix)] or [
        pytest.fail(f"{args!r} answered {reply!r}, not an ACL denial")]
    user = urllib.parse.urlsplit(url).username
    entries = admin.acl_log()
    assert [(e["username"], e["reason"], e["count"]) for e in entries] == [(user, reason, 1)], (
        args, reply, entries)
    if reason == "command":
        # the object is the command (or command|subcommand) refused
        assert entries[0]["object"].split("|")[0] == str(args[0]).lower(), entries
        assert f"'{entries[0]['object']}'".encode() in reply, reply
    return reply, reason


def test_default_user_is_off(acl_host: AclHost) -> None:
    """Without a password nothing works, and the default user cannot log in."""
    port = acl_host.host.redis_port
    assert command(None, port, "GET", "x").startswith(b"-NOAUTH")
    assert command(None, port, "AUTH", "default", "").startswith(b"-WRONGPASS")
    bad = acl_host.alpha.replace("@", "x@")  # alpha's user, a wrong password
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(bad).ping()


def test_client_can_send_a_request_and_read_results(acl_host: AclHost) -> None:
    """What bakgrab's client does (bakgrab.client.broker): read the request
    key, subscribe to its result, push the request, read the result, ping.
    Publishing the task-sent event is no longer allowed (issue 11: no client
    publishes events), nor kombu's queue declaration (issue 19: see
    test_client_is_refused)."""
    port = acl_host.host.redis_port
    client = redis.Redis.from_url(acl_host.alpha)
    worker = redis.Redis.from_url(acl_host.worker)
    worker.set(f"bakgrab:request-key:{QUEUE}", "PUBLIC")
    assert client.ping()
    assert client.get(f"bakgrab:request-key:{QUEUE}") == b"PUBLIC"
    assert client.lpush(QUEUE, b"request") >= 1
    assert denied(command(acl_host.alpha, port, "PUBLISH", "/0.celeryev/task.sent", "event"))

    sub = client.pubsub()
    sub.subscribe("celery-task-meta-job1")
    assert sub.get_message(timeout=5)["type"] == "subscribe"
    worker.set("celery-task-meta-job1", b'{"status": "SUCCESS"}')
    worker.publish("celery-task-meta-job1", b'{"status": "SUCCESS"}')
    msg = sub.get_message(timeout=5)
    assert msg is not None and msg["data"] == b'{"status": "SUCCESS"}'
    sub.unsubscribe("celery-task-meta-job1")
    sub.close()
    assert client.get("celery-task-meta-job1") == b'{"status": "SUCCESS"}'
    assert command(acl_host.alpha, port, "PING") == b"+PONG"
    worker.delete(QUEUE, "celery-task-meta-job1", f"bakgrab:request-key:{QUEUE}")


QUEUE_READS: list[tuple[str | bytes, ...]] = [
    ("LRANGE", QUEUE, "0", "-1"), ("LPOP", QUEUE), ("RPOP", QUEUE), ("BRPOP", QUEUE, "1"),
    ("BLPOP", QUEUE, "1"), ("LINDEX", QUEUE, "0"), ("LPOS", QUEUE, "x"),
    ("LMOVE", QUEUE, "mine", "LEFT", "LEFT"), ("RPOPLPUSH", QUEUE, "mine"),
    ("SORT", QUEUE, "ALPHA"), ("DUMP", QUEUE), ("OBJECT", "ENCODING", QUEUE),
    ("LRANGE", QUEUE.encode() + SEP + b"3", "0", "-1"),
    ("HGETALL", "unacked"), ("HVALS", "unacked"), ("ZRANGE", "unacked_index", "0", "-1"),
    ("SMEMBERS", f"_kombu.binding.{QUEUE}"),
    ("SUBSCRIBE", "/0.celeryev/task.sent"), ("PSUBSCRIBE", "/0.celeryev/*"),
]
WRITES: list[tuple[str | bytes, ...]] = [
    ("LPUSH", "other-queue", "x"), ("DEL", QUEUE), ("LTRIM", QUEUE, "1", "0"),
    ("SET", f"bakgrab:request-key:{QUEUE}", "attacker-key"),
    ("SET", "celery-task-meta-job2", "forged"), ("PUBLISH", "celery-task-meta-job2", "forged"),
    ("PSUBSCRIBE", "celery-task-meta-*"),
    ("PUBLISH", "/0.celery.pidbox", "shutdown"), ("PUBLISH", "/0.celery.pidbox/", "shutdown"),
    ("PUBLISH", "/0.celeryev/task.sent", "forged"),
    ("PUBLISH", "/0.celeryev/task.succeeded", "forged"),
    ("PUBLISH", "/0.celeryev/worker.heartbeat", "forged"),
    ("SREM", f"_kombu.binding.{QUEUE}", "x"), ("SADD", "_kombu.binding.other", "x"),
    # kombu's queue declaration and binding, which no client sends since issue 19
    ("SADD", f"_kombu.binding.{QUEUE}", "x"), ("SADD", f"_kombu.binding_permanent.{QUEUE}", "x"),
    ("LLEN", QUEUE), ("MULTI",), ("MGET", "celery-task-meta-job1"),
]
ADMIN: list[tuple[str | bytes, ...]] = [
    ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("CONFIG", "SET", "dir", "/tmp"),
    ("KEYS", "*"), ("SCAN", "0"), ("RANDOMKEY",), ("MONITOR",), ("ACL", "LIST"),
    ("ACL", "SETUSER", "x", "on"), ("CLIENT", "LIST"), ("CLIENT", "KILL", "TYPE", "normal"),
    ("INFO",), ("SHUTDOWN",), ("SELECT", "1"), ("SWAPDB", "0", "1"),
    ("EVAL", "return 1", "0"), ("SCRIPT", "FLUSH"), ("FUNCTION", "LIST"), ("SAVE",),
    ("BGSAVE",), ("REPLICAOF", "127.0.0.1", "1"), ("MIGRATE", "127.0.0.1", "1", QUEUE, "0", "1"),
]


@pytest.mark.parametrize("args", QUEUE_READS + WRITES + ADMIN, ids=lambda a: " ".join(
    x if isinstance(x, str) else repr(x) for x in a))
def test_client_is_refused(acl_host: AclHost, args: tuple[str | bytes, ...]) -> None:
    """Reading any queue, the unacked hash or the events; writing anything
    but its requests; the request key's slot, forged results, remote control
    (Celery's pidbox), and every admin command: NOPERM, each recorded in
    Redis's ACL LOG as this client's denial."""
    refused_by_acl(acl_host.host, acl_host.beta, *args)


def test_client_cannot_read_another_clients_request(acl_host: AclHost) -> None:
    """Beta's queued request stays unreadable to alpha (every way of reading
    a list is refused), while the worker's credential can take it."""
    host = acl_host.host
    marker = f"beta-request-{secrets.token_hex(4)}"
    assert redis.Redis.from_url(acl_host.beta).lpush(QUEUE, marker) >= 1
    for args in QUEUE_READS[:12]:
        reply = command(acl_host.alpha, host.redis_port, *args)
        assert denied(reply), (args, reply)
        assert marker.encode() not in reply
    worker = redis.Redis.from_url(acl_host.worker)
    assert worker.rpop(QUEUE) == marker.encode()


def test_worker_credential_cannot_run_dangerous_commands(acl_host: AclHost) -> None:
    """The worker's user holds every key and channel but not the @dangerous
    commands; only the admin user (for the operator) has them."""
    port = acl_host.host.redis_port
    for args in [("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("ACL", "LIST"),
                 ("MONITOR",), ("SHUTDOWN",)]:
        assert denied(command(acl_host.worker, port, *args)), args
    assert acl_host.host.admin().acl_whoami() == "admin"


def test_a_client_added_while_redis_runs_works_at_once(acl_host: AclHost) -> None:
    """add-client.sh reloads Redis's users (the admin password on redis-cli's
    stdin): the new client connects at once and the others still do."""
    host = acl_host.host
    url = host.add_client("gamma", deploy.new_key(acl_host.tmp / "keys" / "gamma"))
    assert redis.Redis.from_url(url).ping()
    assert redis.Redis.from_url(acl_host.alpha).ping()
    assert denied(command(url, host.redis_port, "LRANGE", QUEUE, "0", "-1"))


def env_for(broker: str, tmp: Path, **settings: str) -> dict[str, str]:
    """Settings through the environment: the broker URL's password stays out of argv."""
    env = support.worker_env(**settings)
    (tmp / "empty.toml").write_text("")
    env.update({"BAKGRAB_BROKER": broker, "BAKGRAB_CONFIG": str(tmp / "empty.toml"),
                "XDG_STATE_HOME": str(tmp / "state")})
    return env


def test_real_worker_and_backup_with_the_acl_users(acl_host: AclHost, tmp_path: Path) -> None:
    """`bakgrab worker` as the worker user and `bakgrab backup` as client
    alpha complete a backup (Redis denies neither anything), and a failing
    one reports its failure; neither password reached argv or output."""
    host = acl_host.host
    storage = tmp_path / "storage"
    storage.mkdir()
    worker = support.Proc([support.BAKGRAB, "worker"], tmp_path / "worker.log",
                          env=env_for(acl_host.worker, tmp_path, storage=str(storage)))
    try:
        support.wait_for(lambda: " ready." in worker.text() or not worker.alive(), 60,
                         "worker ready")
        assert worker.alive(), worker.text()[-3000:]
        host.admin().acl_log_reset()
        src = tmp_path / "src"
        src.mkdir()
        (src / "f").write_text("x")
        client_env = env_for(acl_host.alpha, tmp_path)
        argv = [support.BAKGRAB, "backup", "--name", "acl-e2e", "--source", str(src), "--json"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=client_env)
        assert done.returncode == 0, done.stderr + worker.text()[-3000:]
        result = json.loads(done.stdout)
        assert (storage / result["snapshot"] / "f").read_text() == "x"
        assert deploy.acl_denials(host) == []

        # a failure travels back too: another sshd host key for the same name
        shutil.rmtree(tmp_path / "state")
        failed = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                                env=client_env)
        assert failed.returncode == 4, failed.stderr
        assert "not signed by the client registered for this name" in failed.stderr

        # A failed job is final: the client revokes nothing (no remote
        # control, which clients may not do, deploy/backup-host/acl.sh), so
        # Redis denied it nothing, not merely nothing unexpected (issue 13).
        assert deploy.acl_denials(host) == []
        passwords = [deploy.Secret(urllib.parse.urlsplit(u).password or "")
                     for u in (acl_host.worker, acl_host.alpha)]
        assert all(passwords)
        blob = worker.text() + done.stdout + done.stderr + failed.stderr
        blob += Path(f"/proc/{worker.pid}/cmdline").read_text()
        assert deploy.leaked(blob, passwords) == []
    finally:
        worker.stop()
    assert os.path.isdir(storage)


def test_hostile_items_and_events_under_the_acl(acl_host: AclHost, tmp_path: Path) -> None:
    """Under the deploy ACL (issue 11, attacks 2, 6, 7 and 9): a client's
    hand-made items (not JSON, Celery's celery.accumulate, an eta a day ahead)
    are dropped by a real worker, which keeps running; its PUBLISH of a forged
    task-succeeded event is refused; then a real backup of another client
    succeeds, and every event the worker's credential sees meanwhile comes
    from the worker: no client publishes, not even task-sent."""
    from celery import Celery

    from tests.integration.test_hostile_messages import envelope, future, raw

    host = acl_host.host
    storage = tmp_path / "storage"
    storage.mkdir()
    worker = support.Proc([support.BAKGRAB, "worker"], tmp_path / "worker.log",
                          env=env_for(acl_host.worker, tmp_path, storage=str(storage),
                                      enrol="first-use"))
    events: list[dict[str, Any]] = []
    watcher = Celery(broker=str(acl_host.worker))
    try:
        support.wait_for(lambda: " ready." in worker.text() or not worker.alive(), 60,
                         "worker ready")
        assert worker.alive(), worker.text()[-3000:]
        ready = threading.Event()

        def capture() -> None:
            with watcher.connection() as conn:
                recv = watcher.events.Receiver(conn, handlers={"*": events.append})
                ready.set()
                with contextlib.suppress(Exception):  # it ends by its timeout
                    recv.capture(limit=None, timeout=90, wakeup=True)

        threading.Thread(target=capture, daemon=True).start()
        assert ready.wait(10)
        host.admin().acl_log_reset()

        beta = redis.Redis.from_url(acl_host.beta)
        hostile = [b"not json", raw(envelope(task="celery.accumulate", args=[1, 2])),
                   raw(envelope(eta=future(86400)))]
        for item in hostile:
            assert beta.lpush(QUEUE, item) >= 1
        support.wait_for(lambda: worker.text().count("dropped a message") == len(hostile), 20,
                         "the worker to drop the items")
        # Redis itself refuses a value over 8 MiB (proto-max-bulk-len in the snippet)
        with pytest.raises(redis.RedisError):
            redis.Redis.from_url(acl_host.beta).lpush(QUEUE, b"x" * (9 << 20))
        forged = json.dumps({"type": "task-succeeded", "uuid": str(uuid.uuid4()),
                             "hostname": "bakgrab.bakgrab@forged", "result": "{}"})
        assert denied(command(acl_host.beta, host.redis_port, "PUBLISH",
                              "/0.celeryev/task.succeeded", forged))
        assert worker.alive()

        src = tmp_path / "src"
        src.mkdir()
        (src / "f").write_text("x")
        argv = [support.BAKGRAB, "backup", "--name", "acl-hostile", "--source", str(src),
                "--json"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                              env=env_for(acl_host.alpha, tmp_path))
        assert done.returncode == 0, done.stderr + worker.text()[-3000:]
        assert (storage / json.loads(done.stdout)["snapshot"] / "f").read_text() == "x"
        support.wait_for(lambda: any(e["type"] == "task-succeeded" for e in events), 20,
                         "the task-succeeded event")
        # the only denial is beta's forged event: alpha's backup publishes nothing
        assert deploy.acl_denials(host) == ["client-beta: command publish"]
        task_events = [e for e in events if e["type"].startswith("task-")]
        assert task_events
        assert {e["hostname"] for e in events} == {worker_hostname(worker)}
        assert not [e for e in task_events if e["type"] == "task-sent"]
        assert worker.alive()
    finally:
        watcher.close()
        worker.stop()


def worker_hostname(worker: support.Proc) -> str:
    """The hostname the worker's events carry (its --hostname)."""
    m = re.search(r"(bakgrab\.\S+@\S+) ready\.", worker.text())
    assert m, worker.text()[-2000:]
    return m.group(1)
