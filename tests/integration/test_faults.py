"""Faults with real processes and real signals: nothing lost, nothing half-done
mistaken for a backup, no process left behind.

Every test shrinks timeouts (rsync --timeout, ServerAlive, retry backoff,
visibility timeout, shutdown grace) so that it takes seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import xxhash
from celery import Celery

from bakgrab.worker import manifest
from bakgrab.worker.storage import Storage
from tests import support
from tests.conftest import need_root
from tests.integration.test_retention import free_bytes, identities, small_fs, still_alive
from tests.support import alive, comm, descendants

pytestmark = pytest.mark.integration

FAST = {"rsync_timeout": "4", "connect_timeout": "3", "server_alive_interval": "2",
        "retry_backoff": "0.3", "retry_backoff_max": "1", "visibility_timeout": "120",
        "shutdown_grace": "2"}
# Only where a whole worker dies does the test wait for the visibility timeout;
# elsewhere a short one would redeliver grabs that are still running.
SHORT_VISIBILITY = "6"


def slow_worker(tmp_path: Path, storage: Path, broker: str, log: str = "worker.log",
                **extra: str) -> support.Proc:
    settings = {**FAST, "bwlimit": "400K", **extra}
    return support.start_worker(storage, broker, tmp_path / log, "--concurrency", "1",
                                env=support.worker_env(**settings))


def make_source(path: Path, files: int = 24, size: int = 100_000) -> Path:
    path.mkdir(parents=True)
    for i in range(files):
        (path / f"f{i:03d}").write_bytes(os.urandom(size))
    return path


def start_client(broker: str, name: str, src: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [support.BAKGRAB, "backup", "--broker", broker, "--name", name, "--source", str(src),
         "--json", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rsync_pids(worker: support.Proc) -> list[int]:
    return [p for p in descendants(worker.pid) if comm(p) == "rsync"]


def wait_pulling(worker: support.Proc, storage: Path, name: str, min_files: int = 2) -> int:
    """Wait until rsync is running and has written some files; its pid."""
    inprogress = storage / ".bakgrab" / "inprogress" / name

    def ready() -> int | None:
        pids = rsync_pids(worker)
        if pids and inprogress.is_dir() and len(list(inprogress.glob("f*"))) >= min_files:
            return pids[0]
        return None

    return int(support.wait_for(ready, 60, "the pull to be under way", interval=0.05))


def finish(client: subprocess.Popen[str], timeout: float = 120) -> tuple[int, dict, str]:
    out, err = client.communicate(timeout=timeout)
    return client.returncode, (json.loads(out) if out.strip() else {}), err


def assert_clean(worker: support.Proc | None, storage: Path) -> None:
    """No rsync or ssh left under the worker; no key file left in the storage.

    A running worker removes the key only once its rsync is gone, while the
    job unwinds (and the client may hear "revoked" before either): so both
    are waited for, each within a bound. A stopped worker is checked at once."""
    def no_key() -> bool:
        return not list((storage / ".bakgrab" / "run").glob("*/key"))

    if worker is not None:
        support.wait_for(lambda: not [p for p in descendants(worker.pid)
                                      if comm(p) in ("rsync", "ssh")], 30,
                         "rsync and ssh to end")
        support.wait_for(no_key, 30, "the job's key file to be removed")
    assert no_key()


def one_snapshot_identical(storage: Path, name: str, src: Path) -> Path:
    snaps = support.snapshots(storage, name)
    assert len(snaps) == 1, snaps
    assert support.rsync_diff(src, snaps[0]) == []
    return snaps[0]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_source(tmp_path / "src")


def test_pool_child_killed_mid_pull(tmp_path: Path, redis_url: str, storage: Path,
                                    src: Path) -> None:
    """SIGKILL of the pool process mid-pull: the job is delivered again, resumes
    into the same in-progress dir and completes; one snapshot, no orphans."""
    worker = slow_worker(tmp_path, storage, redis_url)
    try:
        client = start_client(redis_url, "kid", src)
        rsync = wait_pulling(worker, storage, "kid")
        pool_child = int(Path(f"/proc/{rsync}/stat").read_text().rsplit(")", 1)[1].split()[1])
        os.kill(pool_child, signal.SIGKILL)
        support.wait_for(lambda: not alive(rsync), 10, "rsync to die with its parent")
        code, result, err = finish(client)
        assert code == 0, err + worker.text()[-3000:]
        one_snapshot_identical(storage, "kid", src)
        assert result["bytes_transferred"] < sum(p.stat().st_size for p in src.iterdir())
        assert_clean(worker, storage)
    finally:
        worker.stop()


def test_whole_worker_killed_mid_pull(tmp_path: Path, redis_url: str, storage: Path,
                                      src: Path) -> None:
    """SIGKILL of the whole worker mid-pull: no rsync or ssh survives it; a new
    worker gets the unacked job back after the visibility timeout and completes."""
    worker = slow_worker(tmp_path, storage, redis_url, visibility_timeout=SHORT_VISIBILITY)
    client = start_client(redis_url, "whole", src)
    try:
        wait_pulling(worker, storage, "whole")
        below = descendants(worker.pid)
        os.killpg(worker.pid, signal.SIGKILL)
        support.wait_for(lambda: not [p for p in below if alive(p)], 15,
                         "every process of the worker to die")
        again = slow_worker(tmp_path, storage, redis_url, "worker2.log", bwlimit="",
                            visibility_timeout=SHORT_VISIBILITY)
        try:
            code, result, err = finish(client)
            assert code == 0, err + again.text()[-3000:]
            one_snapshot_identical(storage, "whole", src)
            assert_clean(again, storage)
        finally:
            again.stop()
    finally:
        client.kill()
        worker.stop()


def test_redis_restart_mid_grab(tmp_path: Path, storage: Path, src: Path) -> None:
    """Redis stopped and started again mid-grab: the worker reconnects, the
    result still reaches the client, which exits 0."""
    port = support.free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(tmp_path)]
    redis1 = support.Proc(argv, tmp_path / "redis1.log")
    url = f"redis://127.0.0.1:{port}/0"
    support.wait_for(lambda: support.port_open(port), 10, "redis")
    worker = slow_worker(tmp_path, storage, url)
    redis2 = None
    try:
        client = start_client(url, "rr", src)
        wait_pulling(worker, storage, "rr")
        redis1.stop()
        time.sleep(1)
        redis2 = support.Proc(argv, tmp_path / "redis2.log")
        code, result, err = finish(client)
        assert code == 0, err + worker.text()[-3000:]
        one_snapshot_identical(storage, "rr", src)
    finally:
        worker.stop()
        redis1.stop()
        if redis2:
            redis2.stop()


def test_client_killed_then_next_grab_resumes(tmp_path: Path, redis_url: str,
                                              storage: Path, src: Path) -> None:
    """SIGKILL of the client mid-grab: the worker's rsync fails promptly, the
    job's first retry finds no client waiting and is cancelled (JobCancelled,
    no retry after it: issue 13), the in-progress dir is kept, and the next
    grab of that name resumes from it (sends less than the whole tree)."""
    worker = slow_worker(tmp_path, storage, redis_url)
    try:
        client = start_client(redis_url, "ck", src)
        rsync = wait_pulling(worker, storage, "ck", min_files=4)
        client.kill()
        client.wait()
        t0 = time.monotonic()
        support.wait_for(lambda: not alive(rsync), 15, "the worker's rsync to fail")
        assert time.monotonic() - t0 < 15
        # The job's final outcome (issue 13): the record `bakgrab status`
        # counts appears once, when the retry found nobody waiting.
        failures = storage / ".bakgrab" / "failures" / "ck"
        support.wait_for(failures.is_file, 60, "the job to end")
        [record] = [json.loads(line) for line in failures.read_text().splitlines()]
        assert (record["error"], record["exit_code"]) == ("JobCancelled", 15), record
        log = worker.text()
        assert "retry 1/3" in log and "retry 2/" not in log, log[-3000:]
        assert "no client waits for it any more; cancelled" in log
        inprogress = storage / ".bakgrab" / "inprogress" / "ck"
        kept = len(list(inprogress.glob("f*")))
        assert kept >= 4
        assert support.snapshots(storage, "ck") == []
    finally:
        worker.stop()
    worker = slow_worker(tmp_path, storage, redis_url, "worker2.log", bwlimit="")
    try:
        done = support.run_backup(redis_url, "ck", src, "--json")
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        one_snapshot_identical(storage, "ck", src)
        assert result["files_transferred"] <= 24 - kept
        # issue 19: no line of the resumed run names the files the killed
        # one wrote, so no checksum of rsync's is taken: every file is read
        built = json.loads((storage / ".bakgrab" / "meta" / f"{result['snapshot']}.json")
                           .read_text())["manifest"]
        assert (built["claims"], built["claimed"]) == ("off", 0), built
        found = manifest.load(Storage(storage), result["snapshot"])
        assert found is not None and len(found.entries) == 24
        for e in found.entries:
            data = (storage / result["snapshot"] / e.path).read_bytes()
            assert e.digest == "xxh128:" + xxhash.xxh3_128(data).hexdigest(), e.path
        assert_clean(worker, storage)
    finally:
        worker.stop()


def test_network_silence_is_retried(tmp_path: Path, redis_url: str, storage: Path,
                                    src: Path) -> None:
    """The connection goes silent mid-pull (the client's sshd frozen): rsync
    times out, the grab is retried over a new connection and completes."""
    worker = slow_worker(tmp_path, storage, redis_url)
    try:
        client = start_client(redis_url, "cut", src)
        wait_pulling(worker, storage, "cut")
        frozen = [p for p in descendants(client.pid) if comm(p) in ("sshd", "rsync")]
        assert frozen
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        code, result, err = finish(client)
        assert code == 0, err + worker.text()[-3000:]
        assert result["attempts"] >= 2
        one_snapshot_identical(storage, "cut", src)
        assert "retry 1/" in worker.text()
        assert_clean(worker, storage)
        assert not [p for p in frozen if alive(p)]
    finally:
        worker.stop()


def test_disk_full_mid_pull(tmp_path: Path, redis_url: str) -> None:
    """The storage fills up during the pull: the grab fails at once (no retry)
    with exit 6, no snapshot appears, and the next cleanup (another name's
    grab) removes the partial data before touching any backup."""
    need_root()
    with small_fs(tmp_path / "storage", "12m") as storage:
        worker = support.start_worker(storage, redis_url, tmp_path / "worker.log",
                                      env=support.worker_env(**FAST, min_free_abs="1M"))
        try:
            big = make_source(tmp_path / "big", files=20, size=1_000_000)
            done = support.run_backup(redis_url, "big", big)
            assert done.returncode == 6, done.stderr
            assert "filled up during the pull" in done.stderr
            assert "retry" not in worker.text()
            assert support.snapshots(storage, "big") == []
            assert (storage / ".bakgrab" / "inprogress" / "big").is_dir()
            small = make_source(tmp_path / "small", files=2, size=1000)
            need = free_bytes(storage) + 2_000_000
            worker.stop()
            worker = support.start_worker(
                storage, redis_url, tmp_path / "worker2.log",
                env=support.worker_env(**FAST, min_free_abs=str(need)))
            done = support.run_backup(redis_url, "small", small, "--json")
            assert done.returncode == 0, done.stderr
            removed = json.loads(done.stdout)["removed"]
            assert [e["snapshot"] for e in removed] == ["in-progress big"]
            assert not (storage / ".bakgrab" / "inprogress" / "big").exists()
            assert_clean(worker, storage)
        finally:
            worker.stop()


def test_revoke_with_terminate_stops_the_grab(tmp_path: Path, redis_url: str,
                                              storage: Path, src: Path) -> None:
    """A revoke with terminate (what Flower's terminate button sends) stops the
    running grab: rsync and ssh end, the key file is removed, no snapshot
    appears, and the client exits non-zero saying it was revoked."""
    worker = slow_worker(tmp_path, storage, redis_url)
    try:
        client = start_client(redis_url, "rv", src)
        wait_pulling(worker, storage, "rv")
        app = Celery(broker=redis_url, backend=redis_url)
        active = app.control.inspect(timeout=3).active() or {}
        ids = [t["id"] for tasks in active.values() for t in tasks]
        assert len(ids) == 1
        task_id = ids[0]
        app.control.revoke(task_id, terminate=True, signal="SIGTERM")
        code, _, err = finish(client)
        assert code != 0
        assert "revoked" in err
        assert_clean(worker, storage)
        assert support.snapshots(storage, "rv") == []
    finally:
        worker.stop()


def test_sigterm_worker_requeues_and_next_worker_completes(
    tmp_path: Path, redis_url: str, storage: Path, src: Path
) -> None:
    """SIGTERM to the worker mid-grab: after the shutdown grace the grab is
    stopped cleanly and re-queued; the worker exits; the next worker completes
    it and the waiting client exits 0 with one snapshot."""
    worker = slow_worker(tmp_path, storage, redis_url, bwlimit="200K")
    client = start_client(redis_url, "term", src)
    try:
        wait_pulling(worker, storage, "term")
        t0 = time.monotonic()
        worker.signal(signal.SIGTERM)
        worker.popen.wait(30)
        assert time.monotonic() - t0 < 20
        assert "re-queued" in worker.text()
        assert_clean(None, storage)
        again = slow_worker(tmp_path, storage, redis_url, "worker2.log", bwlimit="")
        try:
            code, result, err = finish(client)
            assert code == 0, err + again.text()[-3000:]
            one_snapshot_identical(storage, "term", src)
        finally:
            again.stop()
    finally:
        client.kill()
        worker.stop()


def test_time_limit_stops_the_grab(tmp_path: Path, redis_url: str, storage: Path,
                                   src: Path) -> None:
    """A grab past job_time_limit is stopped: rsync ends, the job fails with a
    clear message, the in-progress dir is kept."""
    worker = slow_worker(tmp_path, storage, redis_url, bwlimit="100K", job_time_limit="3")
    try:
        done = support.run_backup(redis_url, "tl", src)
        assert done.returncode == 11, done.stderr
        assert "job_time_limit" in done.stderr
        assert_clean(worker, storage)
        assert (storage / ".bakgrab" / "inprogress" / "tl").is_dir()
    finally:
        worker.stop()


def test_second_delivery_of_a_finished_job_returns_its_result(
    tmp_path: Path, redis_url: str, storage: Path, worker: support.Proc
) -> None:
    """A job delivered again after it finished (the very same signed message,
    as Redis redelivers it) returns the finished result and makes no second
    snapshot (jobs are idempotent by id)."""
    import uuid

    import redis as redis_lib

    from bakgrab.client import keys
    from bakgrab.client.sshd import OneShotServer, ServerConfig, login_user, parse_allow
    from bakgrab.tasks import GRAB, sealed
    from bakgrab.tasks.request import sign

    src = make_source(tmp_path / "s", files=2, size=100)
    host_key_path, identity = keys.identity(tmp_path / "state" / "bakgrab")
    one_time = keys.one_time_key()
    public = sealed.load_public(
        redis_lib.Redis.from_url(redis_url).get("bakgrab:request-key:bakgrab").decode())
    app = Celery(broker=redis_url, backend=redis_url)
    app.conf.task_serializer = "json"
    server = OneShotServer(ServerConfig(
        source=src, public_key=one_time.public, allow=parse_allow("127.0.0.1"),
        host_key=host_key_path, listen="127.0.0.1")).start()
    try:
        task_id = str(uuid.uuid4())
        fields = sign({"v": 1, "name": "idem", "address": "127.0.0.1", "port": server.port,
                       "user": login_user(),
                       "key": sealed.seal(public, one_time.private.encode()),
                       "host_key": keys.public_line(identity), "excludes": []},
                      GRAB, task_id, identity)
        first = app.send_task(GRAB, task_id=task_id, queue="bakgrab", kwargs=fields,
                              argsrepr="()", kwargsrepr="<job>").get(timeout=60)
        assert len(support.snapshots(storage, "idem")) == 1
        again = app.send_task(GRAB, task_id=task_id, queue="bakgrab", kwargs=fields,
                              argsrepr="()", kwargsrepr="<job>")
        assert again.get(timeout=30) == first
        assert server.served == 1  # the second delivery did not connect
    finally:
        server.close()
        app.close()
    assert len(support.snapshots(storage, "idem")) == 1


def test_unreadable_files_make_a_partial_snapshot(shared_tmp: Path, redis_url: str,
                                                  storage: Path, worker: support.Proc) -> None:
    """Files the client cannot read (rsync exit 23) give a complete snapshot
    marked partial, with the failing paths recorded; the client exits 1."""
    need_root()
    import secrets

    name = "bkg" + secrets.token_hex(3)
    with support.throwaway_user(name, shared_tmp / "home") as user:
        src, env = support.unreadable_tree(shared_tmp, user)
        done = support.run_backup(redis_url, "part", src, "--json", env=env, user=name)
        assert done.returncode == 1, done.stderr
        result = json.loads(done.stdout)
        assert result["partial"] is True and result["rsync_exit"] == 23
        snap = support.snapshots(storage, "part")[0]
        assert (snap / "ok").read_text() == "fine\n"
        meta = json.loads((storage / ".bakgrab" / "meta" / f"{snap.name}.json").read_text())
        assert meta["partial"] is True
        assert meta["failed_paths"] == ["root-only"]


def test_files_vanishing_during_the_pull_are_a_warning(tmp_path: Path, redis_url: str,
                                                       storage: Path) -> None:
    """A file deleted on the client while the pull runs (rsync exit 24) gives a
    complete snapshot with a warning, not a failure; the client exits 0."""
    src = make_source(tmp_path / "src", files=12, size=150_000)
    worker = slow_worker(tmp_path, storage, redis_url)
    try:
        client = start_client(redis_url, "van", src)
        wait_pulling(worker, storage, "van", min_files=1)
        (src / "f011").unlink()
        code, result, err = finish(client)
        assert code == 0, err
        assert result["rsync_exit"] == 24
        assert any("vanished" in w for w in result["warnings"])
        snap = support.snapshots(storage, "van")[0]
        assert not (snap / "f011").exists()
        # the source dir's mtime moved with the delete, after rsync read it
        assert [d for d in support.rsync_diff(src, snap) if not d.endswith(" ./")] == []
    finally:
        worker.stop()


def test_dead_tunnel_never_leaves_the_client_hanging(tmp_path: Path, redis_url: str) -> None:
    """The SSH tunnel to the broker goes silent while the client waits (the
    backup host's sshd frozen): keepalives end the tunnel and the client
    exits non-zero with a clear message instead of waiting for ever."""
    need_root()
    from bakgrab.client import keys

    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    key = keys.one_time_key()
    key_file = tmp_path / "tunnel_key"
    key_file.write_text(key.private)
    key_file.chmod(0o600)
    host_key, host_public = keys.host_key(tmp_path / "tunnel-sshd")
    (tmp_path / "authorized_keys").write_text(key.public + "\n")
    port = support.free_port()
    (tmp_path / "sshd_config").write_text("\n".join([
        "ListenAddress 127.0.0.1", f"Port {port}", f"HostKey {host_key}", "PidFile none",
        f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}", "StrictModes no", "UsePAM no",
        "PermitRootLogin prohibit-password", "AllowTcpForwarding local",
        f"PermitOpen 127.0.0.1:{redis_port}", "ForceCommand /bin/false", ""]))
    sshd = support.Proc([support.which("sshd"), "-D", "-e", "-f", str(tmp_path / "sshd_config")],
                        tmp_path / "sshd.log")
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {host_public}\n")
    src = make_source(tmp_path / "src", files=1, size=10)
    env = {**os.environ, "BAKGRAB_SERVER_ALIVE_INTERVAL": "1"}
    try:
        support.wait_for(lambda: support.port_open(port), 10, "the tunnel's sshd")
        # No worker serves the queue: the client waits on the broker, through the
        # tunnel. A request key is published as a worker would.
        import redis as redis_lib
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        from bakgrab.tasks import sealed

        r = redis_lib.Redis.from_url(redis_url)
        r.set("bakgrab:request-key:bakgrab",
              sealed.public_text(X25519PrivateKey.generate().public_key()))
        client = subprocess.Popen(
            [support.BAKGRAB, "backup", "--broker", redis_url, "--name", "tun",
             "--source", str(src), "--tunnel", f"root@127.0.0.1:{port}",
             "--ssh-option", f"IdentityFile={key_file}", "--ssh-option", "IdentitiesOnly=yes",
             "--ssh-option", f"UserKnownHostsFile={known}",
             "--ssh-option", "StrictHostKeyChecking=yes"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        support.wait_for(lambda: r.llen("bakgrab") == 1, 30, "the job to be queued")
        # The client's children (its tunnel's ssh at least), taken while it
        # lives: once it is reaped they have another parent (issue 13).
        below = identities(descendants(client.pid))
        assert "ssh" in [comm(p) for p in below], [comm(p) for p in below]
        frozen = descendants(sshd.pid)
        assert frozen
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            _, err = client.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            client.kill()
            pytest.fail("the client hung on a dead tunnel")
        assert client.returncode != 0
        assert time.monotonic() - t0 < 90
        assert "lost the connection to the broker" in err, err
        assert client.returncode == 10
        assert still_alive(below) == []
    finally:
        for pid in descendants(sshd.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        sshd.stop()
