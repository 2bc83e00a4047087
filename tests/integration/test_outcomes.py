"""What a grab's end leaves behind, with real workers, clients and storage
(issue 13): never a false snapshot, never a silent failure.

* a redelivered job publishes an in-progress tree only if that very job
  filled it and its pull finished; another grab's half-failed pull is never
  published under an old job's snapshot name;
* a client file named like an errno text does not turn a partial snapshot
  into a "storage full" failure, while a storage really out of inodes does
  fail the grab (the receiver says so and statvfs agrees);
* a grab stopped by ``job_time_limit`` counts as a failure in ``bakgrab status``;
* job records expire with the results they stand for.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from celery import Celery

from tests import support
from tests.conftest import need_root
from tests.integration.test_faults import FAST, finish, make_source, slow_worker, start_client
from tests.integration.test_retention import small_fs

pytestmark = pytest.mark.integration

DAY = 86400


def state(storage: Path) -> Path:
    return storage / ".bakgrab"


def only_job_id(storage: Path) -> str:
    records = sorted(p.stem for p in (state(storage) / "jobs").glob("*.json"))
    assert len(records) == 1, records
    return records[0]


def env(**extra: str) -> dict[str, str]:
    """A worker's settings: fast, and names enrolled by their first grab."""
    return support.worker_env(**FAST, enrol="first-use", **extra)


def grab_json(redis_url: str, name: str, src: Path) -> dict[str, Any]:
    done = support.run_backup(redis_url, name, src, "--json")
    assert done.returncode in (0, 1), done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def publish_request_key(redis_url: str, storage: Path) -> None:
    """What a starting worker does: the storage's request key, on the broker."""
    from bakgrab.tasks import sealed
    from bakgrab.worker.storage import Storage

    private = sealed.load_or_create_private(Storage(storage).prepare().request_key)
    redis_lib.Redis.from_url(redis_url).set("bakgrab:request-key:bakgrab",
                                            sealed.public_text(private.public_key()))


def grab_keeping_message(tmp_path: Path, redis_url: str, storage: Path, name: str,
                         src: Path) -> tuple[dict[str, Any], bytes]:
    """A real grab, and a copy of its message as the broker held it: the client
    sends while no worker runs, the test copies the queued message, then a
    worker does the grab."""
    publish_request_key(redis_url, storage)
    client = start_client(redis_url, name, src)
    try:
        r = redis_lib.Redis.from_url(redis_url)
        raw = support.wait_for(lambda: r.lindex("bakgrab", 0), 30, "the job to be queued")
        worker = support.start_worker(storage, redis_url, tmp_path / f"first-{name}.log",
                                      env=env())
        try:
            code, result, err = finish(client)
        finally:
            worker.stop()
        assert code == 0, err + worker.text()[-3000:]
    finally:
        client.kill()
        client.wait()
    return result, bytes(raw)


def message_id(raw: bytes) -> str:
    task_id: str = json.loads(raw)["headers"]["id"]
    return task_id


def redeliver(redis_url: str, raw: bytes) -> Any:
    """Put the very message back in the queue, as the broker does when a worker
    died before acking it; its result as a fresh AsyncResult."""
    r = redis_lib.Redis.from_url(redis_url)
    task_id = message_id(raw)
    r.delete(f"celery-task-meta-{task_id}")
    r.lpush("bakgrab", raw)
    return Celery(broker=redis_url, backend=redis_url).AsyncResult(task_id)


def unpublish(storage: Path, snapshot: str, name: str, task_id: str) -> None:
    """Put the storage back in the state publish() leaves just before its final
    rename, as if the worker had died there: the pulled tree still in progress
    and marked as this task's finished pull, the job record written but not yet
    marked published."""
    os.rename(storage / snapshot, state(storage) / "inprogress" / name)
    pulls = state(storage) / "pulls"
    pulls.mkdir(mode=0o700, exist_ok=True)
    (pulls / f"{name}.json").write_text(json.dumps({"task_id": task_id, "finished": True}))
    record_path = state(storage) / "jobs" / f"{task_id}.json"
    record = json.loads(record_path.read_text())
    record["published"] = False
    record_path.write_text(json.dumps(record))


def time_limited_grab(tmp_path: Path, redis_url: str, storage: Path, name: str,
                      src: Path) -> None:
    """A real grab of ``name`` stopped by job_time_limit mid-pull: it leaves a
    half-filled in-progress dir (a pull that did not finish)."""
    worker = slow_worker(tmp_path, storage, redis_url, f"slow-{name}.log", bwlimit="100K",
                         job_time_limit="3", enrol="first-use")
    try:
        done = support.run_backup(redis_url, name, src)
        assert done.returncode == 11, done.stderr + worker.text()[-3000:]
        assert "job_time_limit" in done.stderr
    finally:
        worker.stop()
    assert (state(storage) / "inprogress" / name).is_dir()


def tree(storage: Path, name: str) -> list[tuple[str, int]]:
    """Names and sizes in the in-progress dir of ``name``."""
    base = state(storage) / "inprogress" / name
    return sorted((p.name, p.lstat().st_size) for p in base.iterdir())


@pytest.fixture
def fast_worker(tmp_path: Path, redis_url: str, storage: Path) -> Iterator[support.Proc]:
    """A worker that gives up a transient failure at once."""
    proc = support.start_worker(storage, redis_url, tmp_path / "worker.log",
                                env=env(max_retries="0"))
    yield proc
    proc.stop()


# -- 1. only a finished pull of the same task is ever published --------------------


def test_redelivery_publishes_its_own_finished_pull(tmp_path: Path, redis_url: str,
                                                    storage: Path) -> None:
    """A worker that died between writing the job record and the final rename:
    the redelivered job publishes the tree its own finished pull left, under
    the recorded name, and returns the recorded result."""
    src = make_source(tmp_path / "src", files=3, size=1000)
    first, raw = grab_keeping_message(tmp_path, redis_url, storage, "rec", src)
    task_id = only_job_id(storage)
    assert task_id == message_id(raw)
    unpublish(storage, first["snapshot"], "rec", task_id)
    assert support.snapshots(storage, "rec") == []

    worker = support.start_worker(storage, redis_url, tmp_path / "w2.log",
                                  env=env(max_retries="0"))
    try:
        assert redeliver(redis_url, raw).get(timeout=60) == first
    finally:
        worker.stop()
    snaps = support.snapshots(storage, "rec")
    assert [p.name for p in snaps] == [first["snapshot"]]
    assert support.rsync_diff(src, snaps[0]) == []
    assert not (state(storage) / "inprogress" / "rec").exists()


def test_redelivery_never_publishes_another_grabs_half_failed_pull(
    tmp_path: Path, redis_url: str, storage: Path
) -> None:
    """The worker died before its rename; then another grab of the name pulled
    into the in-progress dir and was stopped half-way. The first job,
    delivered again, must not publish that tree: no snapshot dir appears."""
    src = make_source(tmp_path / "src", files=2, size=1000)
    first, raw = grab_keeping_message(tmp_path, redis_url, storage, "hf", src)
    task_id = only_job_id(storage)
    unpublish(storage, first["snapshot"], "hf", task_id)

    time_limited_grab(tmp_path, redis_url, storage, "hf",
                      make_source(tmp_path / "other", files=24, size=100_000))
    half = tree(storage, "hf")
    assert len([n for n, size in half if size == 100_000]) < 24, half  # not finished

    worker = support.start_worker(storage, redis_url, tmp_path / "w2.log",
                                  env=env(max_retries="0"))
    try:
        again = redeliver(redis_url, raw)
        with pytest.raises(Exception) as info:  # noqa: PT011 -- the final failure, checked below
            again.get(timeout=60)
        # its client is gone: grabbed anew, the job fails to connect
        assert type(info.value).__name__ == "TransferInterrupted", info.value
    finally:
        worker.stop()
    assert not (storage / first["snapshot"]).exists()
    assert support.snapshots(storage, "hf") == []
    assert tree(storage, "hf") == half


def test_redelivery_after_cleanup_removed_the_snapshot_publishes_nothing(
    tmp_path: Path, redis_url: str, storage: Path
) -> None:
    """A job published its snapshot, which cleanup later removed; another grab
    of the name was stopped half-way. The job delivered again returns its
    recorded result and publishes nothing: the half-failed pull stays in
    progress."""
    src = make_source(tmp_path / "src", files=2, size=1000)
    first, raw = grab_keeping_message(tmp_path, redis_url, storage, "cr", src)
    time.sleep(1.05)
    (src / "f000").write_bytes(os.urandom(1000))
    worker = support.start_worker(storage, redis_url, tmp_path / "w1.log", env=env())
    try:
        second = grab_json(redis_url, "cr", src)
    finally:
        worker.stop()
    pruned = subprocess.run([support.BAKGRAB, "prune", "--storage", str(storage), "--json",
                             "--min-free-abs", "1000000T"],
                            capture_output=True, text=True, timeout=60)
    assert pruned.returncode == 6, pruned.stderr
    assert [p.name for p in support.snapshots(storage, "cr")] == [second["snapshot"]]

    time_limited_grab(tmp_path, redis_url, storage, "cr",
                      make_source(tmp_path / "other", files=24, size=100_000))
    half = tree(storage, "cr")

    worker = support.start_worker(storage, redis_url, tmp_path / "w2.log",
                                  env=env(max_retries="0"))
    try:
        assert redeliver(redis_url, raw).get(timeout=60) == first
    finally:
        worker.stop()
    assert not (storage / first["snapshot"]).exists()
    assert [p.name for p in support.snapshots(storage, "cr")] == [second["snapshot"]]
    assert tree(storage, "cr") == half


# -- 2. disk-full is the storage's state, not a client's file name ----------------


def test_errno_text_in_a_client_file_name_is_no_disk_full(
    shared_tmp: Path, redis_url: str, storage: Path, fast_worker: support.Proc
) -> None:
    """A client file named like rsync's ENOSPC/EDQUOT text, unreadable (so the
    sender quotes its name in an error line, rsync exit 23): the snapshot is
    published as partial with those paths recorded, not failed as NoSpace."""
    need_root()
    user_name = "bkg" + secrets.token_hex(3)
    names = ["No space left on device (28)", "Disk quota exceeded (122)"]
    with support.throwaway_user(user_name, shared_tmp / "home") as user:
        src = shared_tmp / "src"
        src.mkdir()
        (src / "ok").write_text("fine\n")
        os.chown(src, user.pw_uid, user.pw_gid)
        os.chown(src / "ok", user.pw_uid, user.pw_gid)
        for name in names:
            (src / name).write_text("root only\n")
            os.chmod(src / name, 0o600)
        client_state = shared_tmp / "state"
        client_state.mkdir()
        os.chown(client_state, user.pw_uid, user.pw_gid)
        env = {"PATH": os.environ["PATH"], "HOME": str(shared_tmp),
               "XDG_STATE_HOME": str(client_state)}
        done = support.run_backup(redis_url, "errno", src, "--json", env=env, user=user_name)
    assert done.returncode == 1, done.stderr + fast_worker.text()[-3000:]
    result = json.loads(done.stdout)
    assert result["partial"] is True and result["rsync_exit"] == 23
    snap = support.snapshots(storage, "errno")[0]
    assert (snap / "ok").read_text() == "fine\n"
    meta = json.loads((state(storage) / "meta" / f"{snap.name}.json").read_text())
    assert sorted(meta["failed_paths"]) == sorted(names)


def test_storage_out_of_inodes_is_no_partial_snapshot(tmp_path: Path, redis_url: str) -> None:
    """The storage runs out of inodes mid-pull: rsync cannot create files
    (exit 23, the receiver says ENOSPC) and statvfs shows the storage short of
    inodes, so the grab fails as NoSpace (exit 6), not as a partial snapshot."""
    need_root()
    src = tmp_path / "many"
    src.mkdir()
    for i in range(600):
        (src / f"s{i:04d}").write_text(f"{i}\n")
    with small_fs(tmp_path / "storage", "64m", inodes=400) as storage:
        worker = support.start_worker(storage, redis_url, tmp_path / "worker.log",
                                      env=env(max_retries="0"))
        try:
            done = support.run_backup(redis_url, "inodes", src)
        finally:
            worker.stop()
        assert done.returncode == 6, done.stderr + worker.text()[-3000:]
        assert "filled up during the pull (rsync exit 23)" in done.stderr
        assert support.snapshots(storage, "inodes") == []
        assert (state(storage) / "inprogress" / "inodes").is_dir()


# -- 3. a time-limited grab is a failure ----------------------------------------------


def test_time_limited_grab_counts_as_a_failure(tmp_path: Path, redis_url: str,
                                               storage: Path) -> None:
    """A grab stopped by job_time_limit is a final failure: `bakgrab status`
    counts it (failures 1, exit 13 as the name has no success)."""
    time_limited_grab(tmp_path, redis_url, storage, "tlf",
                      make_source(tmp_path / "src", files=24, size=100_000))
    done = subprocess.run([support.BAKGRAB, "status", "--storage", str(storage), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 13, done.stderr
    names = {n["name"]: n for n in json.loads(done.stdout)["names"]}
    assert names["tlf"]["failures"] == 1, names
    assert names["tlf"]["in_progress"] is True
    line = json.loads((state(storage) / "failures" / "tlf").read_text().splitlines()[0])
    assert (line["error"], line["exit_code"]) == ("JobTimeout", 11)


# -- 4. job records expire with the results --------------------------------------------


def test_job_records_expire_with_the_results(tmp_path: Path, redis_url: str, storage: Path,
                                             fast_worker: support.Proc) -> None:
    """A grab sweeps job records older than the results' lifetime (7 days) and
    keeps younger ones; a swept job's snapshot stays."""
    src = make_source(tmp_path / "src", files=1, size=100)
    jobs = state(storage) / "jobs"
    first = grab_json(redis_url, "exp", src)
    old = jobs / f"{only_job_id(storage)}.json"
    time.sleep(1.05)
    second = grab_json(redis_url, "exp", src)
    young = next(p for p in jobs.glob("*.json") if p != old)
    now = time.time()
    os.utime(old, (now - 7 * DAY - 60, now - 7 * DAY - 60))
    os.utime(young, (now - 7 * DAY + 3600, now - 7 * DAY + 3600))
    # a stray file that is not a job record is left alone
    (jobs / "README").write_text("x")
    os.utime(jobs / "README", (now - 30 * DAY, now - 30 * DAY))

    time.sleep(1.05)
    third = grab_json(redis_url, "exp", src)
    assert not old.exists()
    assert young.exists()
    assert (jobs / "README").exists()
    assert len(list(jobs.glob("*.json"))) == 2
    assert [p.name for p in support.snapshots(storage, "exp")] == [
        first["snapshot"], second["snapshot"], third["snapshot"]]
