"""Checked snapshots (issue 15): real grabs, then `bakgrab verify` finds bit rot,
names every snapshot holding it, and the next grab stores a good copy."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests import support
from tests.conftest import need_root

pytestmark = pytest.mark.integration

EXIT_DAMAGED = 14


def verify(storage: Path, *args: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run([support.BAKGRAB, "verify", "--storage", str(storage), "--json", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def bakgrab_json(*args: str) -> Any:
    done = subprocess.run([support.BAKGRAB, *args, "--json"], capture_output=True, text=True,
                          timeout=120)
    return json.loads(done.stdout)


def flip_byte(path: Path, offset: int = 3) -> None:
    """Rot one byte in place, keeping size and mtime (what bit rot looks like)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def make_tree(src: Path, files: int = 20) -> None:
    (src / "d" / "deep").mkdir(parents=True)
    for i in range(files):
        (src / "d" / f"f{i}").write_bytes(os.urandom(3000 + i))
    (src / "d" / "deep" / "victim").write_bytes(b"the victim file " * 500)
    os.link(src / "d" / "deep" / "victim", src / "victim-link")  # one inode, two paths
    (src / "changes").write_text("one\n")


def backup(redis_url: str, name: str, src: Path) -> dict[str, Any]:
    done = support.run_backup(redis_url, name, src, "--json")
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_bit_rot_found_reported_and_healed(
    tmp_path: Path, redis_url: str, storage: Path, worker: support.Proc
) -> None:
    """A byte flipped in a stored file (size and mtime kept) is found by verify,
    which names every snapshot and path holding that inode and exits 14; list,
    versions and status mark it; the next backup stores a good copy from the
    client instead of linking the bad inode; verify is then clean for the new
    snapshot and still reports the old ones."""
    need_root()
    src = tmp_path / "src"
    make_tree(src)
    backup(redis_url, "host-v", src)
    (src / "changes").write_text("two\n")
    backup(redis_url, "host-v", src)
    s1, s2 = support.snapshots(storage, "host-v")
    victim1, victim2 = s1 / "d/deep/victim", s2 / "d/deep/victim"
    assert victim1.stat().st_ino == victim2.stat().st_ino  # linked by --link-dest

    code, clean = verify(storage)
    assert code == 0, clean
    assert clean["checked"] == clean["files"] == 23  # 20 + victim + 2 "changes" and clean["bad"] == []
    assert clean["never_verified"] == 0 and clean["unverifiable"] == []

    flip_byte(victim2)
    code, found = verify(storage, "--name", "host-v")
    assert code == EXIT_DAMAGED
    assert len(found["bad"]) == 1
    bad = found["bad"][0]
    assert bad["kind"] == "content" and bad["ino"] == victim2.stat().st_ino
    assert bad["snapshots"] == [s1.name, s2.name]
    for snap in (s1, s2):
        assert sorted(bad["where"][snap.name]) == ["d/deep/victim", "victim-link"]
    assert found["good"] == 22

    # marked damaged where people look
    listing = bakgrab_json("list", "--storage", str(storage), "--fast")
    marks = {s["snapshot"]: s["damaged_files"] for s in listing[0]["snapshots"]}
    assert marks == {s1.name: 1, s2.name: 1}
    rows = bakgrab_json("versions", "--storage", str(storage), "--name", "host-v",
                        "d/deep/victim")
    assert [r["damaged"] for r in rows] == [True, True]
    status = bakgrab_json("status", "--storage", str(storage))
    (st,) = status["names"]
    assert st["damaged_files"] == 1 and st["damaged_snapshots"] == 2
    assert st["last_verify"] is not None
    text = subprocess.run([support.BAKGRAB, "list", "--storage", str(storage), "--fast"],
                          capture_output=True, text=True, timeout=60).stdout
    assert text.count("DAMAGED") == 2

    # healing: the next grab pulls the file anew instead of linking the bad inode
    third = backup(redis_url, "host-v", src)
    s3 = storage / third["snapshot"]
    assert (s3 / "d/deep/victim").read_bytes() == (src / "d/deep/victim").read_bytes()
    assert (s3 / "d/deep/victim").stat().st_ino != victim2.stat().st_ino
    assert (s3 / "d/deep/victim").stat().st_ino == (s3 / "victim-link").stat().st_ino
    # everything else still linked
    assert (s3 / "d/f3").stat().st_ino == (s2 / "d/f3").stat().st_ino
    assert not (storage / ".bakgrab" / "heal" / "host-v").exists()

    code, new = verify(storage, "--snapshot", s3.name)
    assert code == 0, new
    assert new["bad"] == [] and new["known_bad"] == 0 and new["checked"] == 22
    code, again = verify(storage, "--name", "host-v")
    assert code == EXIT_DAMAGED
    assert [b["snapshots"] for b in again["bad"]] == [[s1.name, s2.name]]
    listing = bakgrab_json("list", "--storage", str(storage), "--fast")
    marks = {s["snapshot"]: s["damaged_files"] for s in listing[0]["snapshots"]}
    assert marks == {s1.name: 1, s2.name: 1, s3.name: 0}


def test_damaged_and_missing_manifests(
    tmp_path: Path, redis_url: str, storage: Path, worker: support.Proc
) -> None:
    """A manifest whose bytes changed is reported as a damaged manifest (exit
    14), not as damaged data; a snapshot without a manifest (as before
    manifests existed) is reported unverifiable (exit 1), never as good."""
    src = tmp_path / "src"
    make_tree(src, files=5)
    backup(redis_url, "host-m", src)
    (src / "changes").write_text("two\n")
    backup(redis_url, "host-m", src)
    s1, s2 = support.snapshots(storage, "host-m")
    meta = storage / ".bakgrab" / "meta"

    (meta / f"{s1.name}.manifest").unlink()
    code, report = verify(storage)
    assert code == 1, report
    assert report["unverifiable"] == [s1.name] and report["bad"] == []
    assert report["damaged_manifests"] == []
    out = subprocess.run([support.BAKGRAB, "verify", "--storage", str(storage)],
                         capture_output=True, text=True, timeout=60).stdout
    assert f"UNVERIFIABLE {s1.name}" in out

    path = meta / f"{s2.name}.manifest"
    data = bytearray(path.read_bytes())
    at = data.index(b"victim")
    data[at] ^= 0x20  # one letter's case: still valid JSON
    path.write_bytes(bytes(data))
    code, report = verify(storage)
    assert code == EXIT_DAMAGED
    assert [m["snapshot"] for m in report["damaged_manifests"]] == [s2.name]
    assert "checksum" in report["damaged_manifests"][0]["why"]
    assert report["bad"] == [] and report["checked"] == 0


def test_share_rotation_covers_every_file(
    tmp_path: Path, redis_url: str, storage: Path, worker: support.Proc
) -> None:
    """`--share 25%` reads a quarter of the files each run, least recently
    verified first: four runs read every file once, and the count of files
    never verified falls to 0."""
    src = tmp_path / "src"
    make_tree(src, files=38)  # 40 files
    backup(redis_url, "host-r", src)
    (snap,) = support.snapshots(storage, "host-r")
    state = storage / ".bakgrab" / "verified" / "host-r.json"
    seen: list[set[str]] = []
    for run in range(4):
        code, report = verify(storage, "--share", "25%")
        assert code == 0 and report["checked"] == 10, report
        assert report["never_verified"] == 40 - 10 * (run + 1)
        times = json.loads(state.read_text())["inodes"]
        seen.append(set(times))
    assert [len(s) for s in seen] == [10, 20, 30, 40]
    inodes = {f"{p.stat().st_ino}" for p in snap.rglob("*") if p.is_file()}
    assert {k.split(":")[0] for k in seen[-1]} == inodes


def test_verify_runs_while_a_grab_of_another_name_runs(
    tmp_path: Path, redis_url: str, storage: Path
) -> None:
    """verify takes no name's lock: it completes while a slow grab of another
    name is pulling, and that grab still succeeds."""
    worker = support.start_worker(storage, redis_url, tmp_path / "worker.log",
                                  env=support.worker_env(bwlimit="200K"))
    try:
        src = tmp_path / "src"
        make_tree(src, files=5)
        backup(redis_url, "host-a", src)
        big = tmp_path / "big"
        big.mkdir()
        (big / "blob").write_bytes(os.urandom(3 << 20))
        slow: dict[str, Any] = {}

        def run() -> None:
            slow["done"] = support.run_backup(redis_url, "host-b", big, timeout=120)

        t = threading.Thread(target=run)
        t.start()
        try:
            support.wait_for(lambda: (storage / ".bakgrab" / "inprogress" / "host-b").is_dir(),
                             60, "the slow grab pulling")
            code, report = verify(storage, "--name", "host-a")
            still_pulling = t.is_alive()
        finally:
            t.join(150)
        assert code == 0 and report["checked"] == 7, report
        assert still_pulling
        assert slow["done"].returncode == 0, slow["done"].stderr
        code, report = verify(storage, "--name", "host-b")
        assert code == 0 and report["checked"] == 1
    finally:
        worker.stop()


@pytest.mark.root
def test_manifest_and_verify_as_an_unprivileged_worker(shared_tmp: Path, redis_url: str) -> None:
    """A worker user holding only the storage capabilities writes a manifest
    naming every regular file, root-owned 0600 ones in 0700 dirs included,
    and `bakgrab verify` run as that user with those capabilities reads them
    all and finds them good."""
    need_root()
    import secrets

    from bakgrab.tasks.caps import WORKER_CAPS
    from bakgrab.worker import manifest
    from bakgrab.worker.storage import Storage

    tag = secrets.token_hex(3)
    with support.throwaway_user(f"bkgv{tag}", shared_tmp / "whome") as w:
        src = shared_tmp / "src"
        support.build_fidelity_tree(src)
        storage = shared_tmp / "storage"
        storage.mkdir()
        os.chown(storage, w.pw_uid, w.pw_gid)
        worker = support.start_worker(storage, redis_url, shared_tmp / "worker.log",
                                      user=w.pw_name, caps=WORKER_CAPS)
        try:
            done = support.run_backup(redis_url, "nrv", src, "--json")
        finally:
            worker.stop()
        assert done.returncode == 0, done.stderr
        (snap,) = support.snapshots(storage, "nrv")
        files = {str(p.relative_to(snap)) for p in snap.rglob("*")
                 if p.is_file() and not p.is_symlink()}
        found = manifest.load(Storage(storage), snap.name)
        assert found is not None
        assert {e.path for e in found.entries} == files
        assert "secret/shadow" in files
        argv = support.as_user(w.pw_name, [support.BAKGRAB, "verify", "--storage", str(storage),
                                           "--json"], caps=WORKER_CAPS)
        ran = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                             env={"PATH": os.environ["PATH"], "HOME": str(shared_tmp),
                                  "BAKGRAB_CONFIG": os.devnull})
        assert ran.returncode == 0, ran.stdout + ran.stderr
        report = json.loads(ran.stdout)
        assert report["checked"] == report["files"] == len({
            (snap / f).stat().st_ino for f in files})


def test_verify_pull_reads_back_what_the_pull_wrote(
    tmp_path: Path, redis_url: str, storage: Path
) -> None:
    """With `verify_pull = "on"` the worker reads every file the pull wrote
    back from the disk before publishing: the run's metadata counts one
    re-read per file written, and a linked file is not read again."""
    worker = support.start_worker(storage, redis_url, tmp_path / "worker.log",
                                  env=support.worker_env(verify_pull="on"))
    try:
        src = tmp_path / "src"
        make_tree(src, files=5)
        backup(redis_url, "host-p", src)
        (src / "changes").write_text("two\n")
        backup(redis_url, "host-p", src)
    finally:
        worker.stop()
    first, second = support.snapshots(storage, "host-p")
    metas = [json.loads((storage / ".bakgrab" / "meta" / f"{s.name}.json").read_text())
             for s in (first, second)]
    assert [m["manifest"]["reread"] for m in metas] == [7, 1]
    # (each file's digest read during the pull, after it, or taken from
    # rsync's checksum, issue 19: verify_pull reads it back all the same)
    assert [m["manifest"]["hashed"] + m["manifest"]["prehashed"] + m["manifest"]["claimed"]
            for m in metas] == [7, 1]
    assert metas[0]["manifest"]["claims"] == "used" and metas[0]["manifest"]["claimed"] >= 1
    assert [m["manifest"]["reread_bad"] for m in metas] == [[], []]
    assert verify(storage)[0] == 0


def test_backup_verify_asks_this_grab_only_to_read_back(
    tmp_path: Path, redis_url: str, storage: Path, worker: support.Proc
) -> None:
    """`bakgrab backup --verify` (a signed request field) makes the worker,
    whose verify_pull is off, read back what this pull wrote; the next grab
    without it reads nothing back."""
    src = tmp_path / "src"
    make_tree(src, files=5)
    done = support.run_backup(redis_url, "host-v", src, "--verify")
    assert done.returncode == 0, done.stderr
    (src / "changes").write_text("two\n")
    done = support.run_backup(redis_url, "host-v", src)
    assert done.returncode == 0, done.stderr
    first, second = support.snapshots(storage, "host-v")
    metas = [json.loads((storage / ".bakgrab" / "meta" / f"{s.name}.json").read_text())
             for s in (first, second)]
    assert [m["manifest"]["reread"] for m in metas] == [7, 0]


def test_scheduled_verify_runs_through_the_queue(
    tmp_path: Path, redis_url: str, storage: Path
) -> None:
    """With `verify_every` the worker's beat queues `bakgrab.scheduled_verify`
    on its internal queue: it reads the stored files (the verify state names
    every inode), finds a rotted byte (a damage record naming the snapshot),
    and its summary is the task's result in the backend (what Flower shows);
    the pool goes on serving grabs at its own priority."""
    import redis as redis_client

    env = support.worker_env(verify_every="2s", verify_share="100%")
    worker = support.start_worker(storage, redis_url, tmp_path / "worker.log", "--beat",
                                  env=env)
    try:
        src = tmp_path / "src"
        make_tree(src, files=5)
        backup(redis_url, "host-s", src)
        (snap,) = support.snapshots(storage, "host-s")
        state = storage / ".bakgrab" / "verified" / "host-s.json"
        support.wait_for(lambda: state.exists() and json.loads(state.read_text())[
            "last_run"]["checked"] == 7, 30, "a scheduled verify")
        flip_byte(snap / "d" / "f2")
        record = storage / ".bakgrab" / "damage" / "host-s.json"
        support.wait_for(record.exists, 30, "the scheduled verify finding the damage")
        (bad,) = json.loads(record.read_text())["files"]
        assert bad["snapshots"] == [snap.name] and bad["where"][snap.name] == ["d/f2"]
        r = redis_client.Redis.from_url(redis_url)
        results = [json.loads(r.get(k) or b"{}") for k in r.scan_iter("celery-task-meta-*")]
        found = [x["result"] for x in results
                 if isinstance(x.get("result"), dict) and "never_verified" in x["result"]]
        assert any(x["damage_found"] and x["bad"] == 1 for x in found), found
        # grabs still run, at normal priority
        second = support.run_backup(redis_url, "host-s", src)
        assert second.returncode == 0, second.stderr
        assert "bakgrab.scheduled_verify" in worker.text()
        pool = [worker.pid, *support.descendants(worker.pid)]
        niced = {pid: (Path(f"/proc/{pid}/cmdline").read_bytes()[:200], prio) for pid in pool
                 if (prio := os.getpriority(os.PRIO_PROCESS, pid)) != 0}
        assert niced == {}, niced
        classes = [subprocess.run(["ionice", "-p", str(pid)], capture_output=True, text=True,
                                  timeout=10).stdout for pid in pool]
        assert not any("idle" in c for c in classes), classes
    finally:
        worker.stop()
