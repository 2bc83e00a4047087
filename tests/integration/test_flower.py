"""`bakgrab flower`: real redis-server, Celery worker, grabs and Flower, read over HTTP.

One fleet per module: a worker allowing one retry, `bakgrab flower` on a free
loopback port, and three real backups: one that succeeds, one refused because
the client's host key changed, and one whose client the worker cannot reach
(retried once, then failed). The helpers here are also used by
test_flower_browser.py and test_status.py.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import support

pytestmark = pytest.mark.integration

USER = "watcher"
PASSWORD = "flower-test-pw-6c1f0e"  # noqa: S105 -- a throwaway for this test's Flower


def flower_env(basic_auth: str | None = f"{USER}:{PASSWORD}") -> dict[str, str]:
    """The environment of `bakgrab flower`: credentials there, never in argv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BAKGRAB_", "FLOWER_"))}
    if basic_auth is not None:
        env["BAKGRAB_FLOWER_BASIC_AUTH"] = basic_auth
    return env


def start_flower(broker: str, log: Path) -> tuple[support.Proc, str]:
    """`bakgrab flower` on a free port; returns it and its base URL once it
    answers HTTP and its event receiver is connected to the broker."""
    port = support.free_port()
    proc = support.Proc([support.BAKGRAB, "flower", "--broker", broker, "--port", str(port)],
                        log, env=flower_env())
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if not proc.alive():
            raise RuntimeError(f"flower died:\n{proc.text()[-3000:]}")
        return http(base + "/api/workers", auth=True)[0] == 200 and "Connected to" in proc.text()

    try:
        support.wait_for(ready, 30, "flower ready")
    except BaseException:
        proc.stop()
        raise
    return proc, base


def http(url: str, auth: bool | tuple[str, str] = True, method: str = "GET",
         body: bytes | None = None) -> tuple[int, bytes]:
    """Status and body of one request; ``auth`` True sends the test's credentials."""
    req = urllib.request.Request(url, method=method, data=body)  # noqa: S310 -- loopback http
    if auth is not False:
        user, password = (USER, PASSWORD) if auth is True else auth
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 -- loopback http
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def flower_tasks(base: str) -> dict[str, dict[str, Any]]:
    status, body = http(base + "/api/tasks")
    assert status == 200, body
    tasks: dict[str, dict[str, Any]] = json.loads(body)
    return tasks


def wait_for_states(base: str, want: dict[str, str], timeout: float = 60) -> dict[str, Any]:
    """Flower's tasks once each task id in ``want`` shows its final state there."""
    def done() -> dict[str, Any] | None:
        tasks = flower_tasks(base)
        ok = all(tasks.get(tid, {}).get("state") == state for tid, state in want.items())
        return tasks if ok else None

    found: dict[str, Any] = support.wait_for(done, timeout, f"flower to show {want}", 0.5)
    return found


def task_ids(storage: Path, name: str) -> list[str]:
    """Task ids of ``name``'s snapshots, from their metadata."""
    ids = []
    for snap in support.snapshots(storage, name):
        meta = json.loads((storage / ".bakgrab" / "meta" / f"{snap.name}.json").read_text())
        ids.append(meta["task_id"])
    return ids


def failed_task_ids(storage: Path, name: str) -> list[str]:
    path = storage / ".bakgrab" / "failures" / name
    if not path.exists():
        return []
    return [json.loads(line)["task_id"] for line in path.read_text().splitlines() if line]


def unreachable_backup(broker: str, name: str, source: Path,
                       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A real `bakgrab backup` whose job names an address where its one-shot
    sshd does not listen (it listens on 127.0.0.1, the job says 127.0.0.2):
    the worker's ssh is refused, a transient failure, retried as configured,
    then final. The client exits 9."""
    return support.run_backup(broker, name, source, "--address", "127.0.0.2",
                              "--listen", "127.0.0.1", env=env)


@dataclass
class Fleet:
    broker: str
    storage: Path
    worker: support.Proc
    flower: support.Proc
    base: str
    ok: str
    """Task id of the successful backup."""
    refused: str
    """Task id of the backup refused for a changed host key."""
    retried: str
    """Task id of the unreachable grab (one retry, then FAILURE)."""
    backups: list[subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    redis, broker = support.start_redis(tmp / "redis")
    procs = [redis]
    try:
        storage = tmp / "storage"
        worker = support.start_worker(storage, broker, tmp / "worker.log", "--max-retries", "1")
        procs.append(worker)
        flower, base = start_flower(broker, tmp / "flower.log")
        procs.append(flower)
        src = tmp / "src"
        src.mkdir()
        (src / "file").write_text("monitored\n")
        client_env = support.worker_env()
        client_env.update(XDG_STATE_HOME=str(tmp / "client-state"),
                          BAKGRAB_CONFIG=os.devnull)
        first = support.run_backup(broker, "flower-a", src, env=client_env)
        assert first.returncode == 0, first.stderr
        shutil.rmtree(tmp / "client-state")  # the client's key changes: refused
        second = support.run_backup(broker, "flower-a", src, env=client_env)
        assert second.returncode == 4, second.stderr
        third = unreachable_backup(broker, "flower-r", src, env=client_env)
        assert third.returncode == 9, third.stderr
        [ok] = task_ids(storage, "flower-a")
        # a refusal records no failure (issue 11); the worker logs its task id
        [refused] = re.findall(r"refused bakgrab\.grab (\S+) for flower-a", worker.text())
        [retried] = failed_task_ids(storage, "flower-r")
        yield Fleet(broker, storage, worker, flower, base, ok, refused, retried,
                    [first, second, third])
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_api_shows_each_job_with_its_final_state_name_and_retries(fleet: Fleet) -> None:
    """Flower's /api/tasks has every grab under the task name bakgrab.grab: the
    backup that succeeded as SUCCESS with 0 retries, the refused one as
    FAILURE with 0 retries (not retryable), the unreachable one as FAILURE
    after 1 retry; the failures carry their error."""
    tasks = wait_for_states(fleet.base, {fleet.ok: "SUCCESS", fleet.refused: "FAILURE",
                                         fleet.retried: "FAILURE"})
    ok, refused, retried = (tasks[t] for t in (fleet.ok, fleet.refused, fleet.retried))
    assert {ok["name"], refused["name"], retried["name"]} == {"bakgrab.grab"}
    assert (ok["retries"], refused["retries"], retried["retries"]) == (0, 0, 1)
    assert ok["runtime"] > 0
    assert "'name': 'flower-a'" in ok["kwargs"] and "'name': 'flower-r'" in retried["kwargs"]
    assert "'snapshot': 'flower-a." in ok["result"]
    assert "RequestRefused" in refused["exception"]
    assert "TransferInterrupted" in retried["exception"]
    assert "<redacted>" in ok["kwargs"] and "<redacted>" in retried["kwargs"]


def test_no_field_shows_the_private_key(fleet: Fleet) -> None:
    """Nothing Flower serves about the jobs (the API's task list and task info,
    each task's page, the data of the tasks page) contains a private key,
    though each job carried one."""
    wait_for_states(fleet.base, {fleet.retried: "FAILURE"})
    blob = http(fleet.base + "/api/tasks")[1]
    status, table = http(fleet.base + "/tasks/datatable?" + urllib.parse.urlencode({
        "draw": 1, "start": 0, "length": 100, "search[value]": "",
        "order[0][column]": 0, "order[0][dir]": "asc", "columns[0][data]": "name"}))
    assert status == 200 and fleet.ok.encode() in table, table
    blob += table
    for tid in (fleet.ok, fleet.refused, fleet.retried):
        status, body = http(f"{fleet.base}/api/task/info/{tid}")
        assert status == 200, body
        blob += body
        blob += http(f"{fleet.base}/task/{tid}")[1]
    text = blob.decode(errors="replace")
    assert fleet.ok in text and fleet.retried in text
    for marker in support.KEY_MARKERS:
        assert marker not in text


def test_requests_without_the_password_get_401(fleet: Fleet) -> None:
    """The UI and the API answer 401 without credentials or with a wrong
    password, and 200 with the right ones."""
    for path in ("/", "/tasks", "/api/tasks", f"/api/task/info/{fleet.ok}", "/api/workers"):
        assert http(fleet.base + path, auth=False)[0] == 401, path
        assert http(fleet.base + path, auth=(USER, "wrong"))[0] == 401, path
        assert http(fleet.base + path)[0] == 200, path


def test_flower_is_read_only(fleet: Fleet) -> None:
    """Even with the password, Flower cannot act: sending or applying a task,
    revoking, aborting or terminating one, rate limits, consumers and pool or
    worker control all answer 403 "Read only"; the worker lives on."""
    # Flower learns of workers by broadcast inspect replies, which may come
    # after the first request: ask again (refresh) until it knows, bounded.
    workers = support.wait_for(
        lambda: json.loads(http(fleet.base + "/api/workers?refresh=1")[1]), 60,
        "flower to see the worker", interval=1)
    worker = next(iter(workers))
    posts = ["/api/task/async-apply/bakgrab.grab", "/api/task/apply/bakgrab.grab",
             "/api/task/send-task/bakgrab.grab", f"/api/task/abort/{fleet.ok}",
             f"/api/task/revoke/{fleet.ok}?terminate=true", f"/api/worker/shutdown/{worker}",
             f"/api/worker/pool/restart/{worker}", f"/api/task/rate-limit/{worker}",
             f"/api/worker/queue/add-consumer/{worker}?queue=other"]
    for path in posts:
        status, body = http(fleet.base + path, method="POST", body=b"{}")
        assert status == 403 and b"Read only" in body, (path, status, body)
    assert fleet.worker.alive()


def test_password_is_in_no_argv_and_no_log(fleet: Fleet) -> None:
    """The basic-auth password is in neither Flower's nor the worker's argv,
    and in no log line of Flower, the worker or the clients."""
    cmdline = Path(f"/proc/{fleet.flower.pid}/cmdline").read_bytes()
    assert b"flower" in cmdline and PASSWORD.encode() not in cmdline
    texts = [fleet.flower.text(), fleet.worker.text()]
    texts += [p.stdout + p.stderr for p in fleet.backups]
    for text in texts:
        assert PASSWORD not in text


def test_only_final_failures_are_recorded(fleet: Fleet) -> None:
    """The worker records a failed grab once, when it fails for good: the
    retried grab's first attempt is not a failure; a success is none; a
    refused request (not signed by the name's client) is none either (issue 11)."""
    wait_for_states(fleet.base, {fleet.retried: "FAILURE", fleet.refused: "FAILURE"})
    assert failed_task_ids(fleet.storage, "flower-a") == []
    assert failed_task_ids(fleet.storage, "flower-r") == [fleet.retried]
    record = json.loads((fleet.storage / ".bakgrab" / "failures" / "flower-r").read_text())
    assert record["error"] == "TransferInterrupted" and record["exit_code"] == 9


def traced(argv: list[str], trace: Path, env: dict[str, str],
           timeout: float = 30) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """``argv`` run under ``strace -f``; its result and every bind(), listen()
    and exit_group() call it or any of its threads and children made, seen
    while they ran (issue 13: not a port probed after the process exited)."""
    done = subprocess.run(["strace", "-f", "-qq", "-e", "trace=bind,listen,exit_group",
                           "-o", str(trace), *argv],
                          capture_output=True, text=True, timeout=timeout, env=env)
    calls = [line for line in trace.read_text().splitlines() if line.strip()]
    return done, calls


@pytest.mark.parametrize("auth", [None, "", "only-a-user", "user:", ":pw"])
def test_flower_refuses_to_start_without_authentication(tmp_path: Path, auth: str | None) -> None:
    """Without credentials (or with malformed ones) `bakgrab flower` exits 3
    with a message saying what to set, and never listens: strace sees every
    bind() and listen() while it runs, and there is none (issue 13)."""
    port = support.free_port()
    done, calls = traced([support.BAKGRAB, "flower", "--broker", "redis://127.0.0.1:1/0",
                          "--port", str(port)], tmp_path / "strace.txt", flower_env(auth))
    assert done.returncode == 3, done.stderr
    assert "bakgrab: error:" in done.stderr
    assert ("needs authentication" in done.stderr if not auth
            else "is not USER:PASSWORD" in done.stderr)
    # the trace is real: it saw the process end with the code it exited with
    assert any(" exit_group(3) " in c for c in calls), calls
    assert [c for c in calls if " bind(" in c or " listen(" in c] == [], calls
