"""The btrfs backend (issue 14) on a real loop-mounted btrfs made by each test.

Each snapshot is a read-only subvolume; a grab snapshots the name's newest
into the in-progress place and rsync updates it in place. The worker runs
unprivileged with its six ambient capabilities wherever the test is about
what it may do; the filesystem is mounted ``user_subvol_rm_allowed`` as
deploy/README.md asks.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from bakgrab.tasks.caps import CLIENT_CAPS, WORKER_CAPS
from bakgrab.worker import btrfs, manifest
from bakgrab.worker.storage import Storage
from tests import support
from tests.conftest import need_root
from tests.integration.test_faults import FAST, rsync_pids

pytestmark = [pytest.mark.integration, pytest.mark.root]

MiB = 1 << 20


def btrfs_mount(size: str = "1G", options: str = "user_subvol_rm_allowed"
                ) -> contextlib.AbstractContextManager[Path]:
    """A fresh btrfs in a loop image, mounted with ``options`` (support.loop_mount)."""
    from bakgrab.tasks.config import parse_size

    need_root()
    if shutil.which("mkfs.btrfs") is None:
        pytest.fail("mkfs.btrfs is missing: run deploy/install-deps.sh --test (btrfs-progs)")
    return support.loop_mount("btrfs", parse_size(size), options)


def extents(path: Path) -> list[tuple[int, int]]:
    """(physical start, end) of each data extent of ``path``, as filefrag reads them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return [(p, p + n) for p, n, _ in btrfs.file_extents(fd)]
    finally:
        os.close(fd)


def shared_bytes(a: Path, b: Path) -> int:
    """How many bytes of disk the data of ``a`` and ``b`` have in common."""
    return sum(max(0, min(e1, e2) - max(s1, s2))
               for s1, e1 in extents(a) for s2, e2 in extents(b))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def worker_user(base: Path) -> Iterator[tuple[str, str]]:
    """Two throwaway users: the worker's and the client's (their names)."""
    tag = secrets.token_hex(3)
    with support.throwaway_user(f"bkgw{tag}", base / "whome") as w, \
            support.throwaway_user(f"bkgc{tag}", base / "chome") as c:
        yield w.pw_name, c.pw_name


def storage_for(mnt: Path, user: str) -> Path:
    import pwd

    storage = mnt / "storage"
    storage.mkdir()
    pw = pwd.getpwnam(user)
    os.chown(storage, pw.pw_uid, pw.pw_gid)
    os.chmod(storage, 0o750)
    return storage


def client_env(shared_tmp: Path, user: str) -> dict[str, str]:
    import pwd

    state = shared_tmp / f"state-{user}"
    state.mkdir(exist_ok=True)
    pw = pwd.getpwnam(user)
    os.chown(state, pw.pw_uid, pw.pw_gid)
    return {"PATH": os.environ["PATH"], "HOME": str(shared_tmp), "XDG_STATE_HOME": str(state)}


def backup(redis_url: str, name: str, src: Path, env: dict[str, str], user: str,
           *args: str) -> dict:
    done = support.run_backup(redis_url, name, src, "--json", *args, env=env, user=user,
                              caps=CLIENT_CAPS, timeout=180)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_snapshots_are_read_only_subvolumes_sharing_extents(shared_tmp: Path,
                                                            redis_url: str) -> None:
    """Unprivileged on both sides, onto btrfs: the fidelity tree comes back
    identical by `rsync -naHAX --checksum` in both snapshots; each snapshot is
    a read-only subvolume (a write fails with EROFS, even for root); the
    second backup, after a 4 KiB change in the middle of an 8 MiB file, shares
    that file's other extents with the first and adds far less than the
    file's size; the first snapshot still holds the old content; nothing is
    left in the in-progress place."""
    with btrfs_mount() as mnt, worker_user(shared_tmp) as (wuser, cuser):
        storage = storage_for(mnt, wuser)
        src = shared_tmp / "src"
        support.build_fidelity_tree(src)
        big = src / "data" / "vm.img"
        big.write_bytes(os.urandom(8 * MiB))
        env = client_env(shared_tmp, cuser)
        worker = support.start_worker(storage, redis_url, shared_tmp / "worker.log",
                                      user=wuser, caps=WORKER_CAPS)
        try:
            first = backup(redis_url, "bt", src, env, cuser)
            old_sha = sha(big)
            with open(big, "r+b") as f:
                f.seek(4 * MiB)
                f.write(os.urandom(4096))
            (src / "data" / "new.txt").write_text("new\n")
            btrfs.sync(mnt)
            free_before = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
            second = backup(redis_url, "bt", src, env, cuser)
            btrfs.sync(mnt)
            free_after = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        finally:
            worker.stop()
        s1, s2 = support.snapshots(storage, "bt")
        assert [s1.name, s2.name] == [first["snapshot"], second["snapshot"]]
        assert support.rsync_diff(src, s2) == []
        for snap in (s1, s2):
            assert btrfs.is_subvolume(snap) and btrfs.readonly(snap)
            with pytest.raises(OSError) as refused:
                (snap / "data" / "intruder").write_text("x")
            assert refused.value.errno == errno.EROFS
        assert sha(s1 / "data" / "vm.img") == old_sha
        assert sha(s2 / "data" / "vm.img") == sha(big)
        assert not (s1 / "data" / "new.txt").exists()
        shared = shared_bytes(s1 / "data" / "vm.img", s2 / "data" / "vm.img")
        assert shared >= 7 * MiB, (shared, extents(s1 / "data" / "vm.img"),
                                   extents(s2 / "data" / "vm.img"))
        assert free_before - free_after < 2 * MiB, (free_before, free_after)
        assert second["files_transferred"] <= 3, second
        # issue 19: rsync rewrites files in place here (--inplace), so an
        # inode it kept is no proof of a new file: no checksum of its lines
        # is taken, and the rewritten file's entry is its new content's
        for snap in (s1, s2):
            built = json.loads((storage / ".bakgrab" / "meta" / f"{snap.name}.json")
                               .read_text())["manifest"]
            assert (built["claims"], built["claimed"]) == ("off", 0), built
            found = manifest.load(Storage(storage), snap.name)
            assert found is not None
            for e in found.entries:
                assert e.digest == "xxh128:" + xxhash.xxh3_128(
                    (snap / e.path).read_bytes()).hexdigest(), (snap.name, e.path)
        assert (s2 / "secret" / "shadow").stat().st_uid == 0
        assert not list((storage / ".bakgrab" / "inprogress").iterdir())


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_cleanup_removes_the_oldest_subvolume_and_waits_for_its_space(
        shared_tmp: Path, redis_url: str) -> None:
    """Three snapshots each holding 150 MiB alone; a grab that needs about
    half a snapshot's worth more free space removes exactly the oldest, as
    the unprivileged worker (subvolume delete under user_subvol_rm_allowed),
    and not a second one: btrfs frees a deleted subvolume's blocks only
    after its cleaner ran, and cleanup waits for that before it measures
    again. The space is back, the subvolume and the trash are gone."""
    with btrfs_mount() as mnt, worker_user(shared_tmp) as (wuser, cuser):
        storage = storage_for(mnt, wuser)
        src = shared_tmp / "src"
        src.mkdir()
        env = client_env(shared_tmp, cuser)
        worker = support.start_worker(storage, redis_url, shared_tmp / "worker.log",
                                      user=wuser, caps=WORKER_CAPS)
        try:
            for _ in range(3):
                (src / "blob").write_bytes(os.urandom(150 * MiB))
                backup(redis_url, "cl", src, env, cuser)
        finally:
            worker.stop()
        old = support.snapshots(storage, "cl")
        assert len(old) == 3
        free = btrfs.settle(mnt)
        need = free + 75 * MiB
        worker = support.start_worker(
            storage, redis_url, shared_tmp / "worker2.log", user=wuser, caps=WORKER_CAPS,
            env=support.worker_env(min_free_abs=str(need), min_keep="1", name_max_bytes="off"))
        try:
            t0 = time.monotonic()
            result = backup(redis_url, "cl", src, env, cuser)
            took = time.monotonic() - t0
        finally:
            worker.stop()
        assert [r["snapshot"] for r in result["removed"]] == [old[0].name], result["removed"]
        now = support.snapshots(storage, "cl")
        assert [p.name for p in now[:2]] == [old[1].name, old[2].name] and len(now) == 3
        assert not old[0].exists()
        assert not list((storage / ".bakgrab" / "trash").iterdir())
        assert free_bytes(mnt) >= need, (free_bytes(mnt), need)
        assert took < 60


def test_killed_rsync_resumes_into_the_inprogress_subvolume(tmp_path: Path,
                                                            redis_url: str) -> None:
    """A second grab (its in-progress place a writable snapshot of the first)
    whose rsync is SIGKILLed mid-pull is retried: the retry finds the same
    subvolume and resumes into it, sending fewer files than the tree holds;
    the published snapshot is identical to the source and read-only, the
    first snapshot still holds the old contents."""
    from tests.integration.test_faults import finish, make_source, start_client

    with btrfs_mount() as mnt:
        storage = mnt / "storage"
        src = make_source(tmp_path / "src")
        worker = support.start_worker(storage, redis_url, tmp_path / "w1.log",
                                      env=support.worker_env(**FAST))
        try:
            assert support.run_backup(redis_url, "rz", src, timeout=120).returncode == 0
        finally:
            worker.stop()
        first = support.snapshots(storage, "rz")[0]
        before = {p.name: sha(p) for p in first.iterdir()}
        for p in src.iterdir():
            p.write_bytes(os.urandom(100_000))
        worker = support.start_worker(storage, redis_url, tmp_path / "w2.log",
                                      "--concurrency", "1",
                                      env=support.worker_env(**FAST, bwlimit="400K"))
        inprogress = storage / ".bakgrab" / "inprogress" / "rz"
        try:
            client = start_client(redis_url, "rz", src)
            try:
                def changed() -> int | None:
                    pids = rsync_pids(worker)
                    if not pids or not btrfs.is_subvolume(inprogress):
                        return None
                    fresh = sum(1 for p in inprogress.iterdir()
                                if sha(p) == sha(src / p.name))
                    return pids[0] if fresh >= 4 else None

                pid = int(support.wait_for(changed, 60, "the pull to be under way", 0.05))
                assert btrfs.is_subvolume(inprogress) and not btrfs.readonly(inprogress)
                os.kill(pid, signal.SIGKILL)
                code, result, err = finish(client, timeout=180)
            finally:
                client.kill()
        finally:
            worker.stop()
        assert code == 0, err + worker.text()[-3000:]
        assert result["attempts"] >= 2, result
        assert result["files_transferred"] <= 24 - 4, result
        second = support.snapshots(storage, "rz")[-1]
        assert support.rsync_diff(src, second) == []
        assert btrfs.readonly(second)
        assert {p.name: sha(p) for p in first.iterdir()} == before
        assert not inprogress.exists()


def test_versions_and_restore_on_subvolumes(tmp_path: Path, redis_url: str) -> None:
    """`bakgrab versions` tells same from changed across subvolume snapshots
    (each its own st_dev): unchanged, new content, a chmod only; `bakgrab
    list` gives each snapshot the space it holds alone; a restore from an
    older snapshot brings its content back."""
    from tests.integration.test_restore import register, restore

    with btrfs_mount() as mnt:
        storage = mnt / "storage"
        src = tmp_path / "src"
        src.mkdir()
        (src / "file").write_bytes(b"one\n" * 1000)
        (src / "other").write_bytes(os.urandom(3 * MiB))
        worker = support.start_worker(storage, redis_url, tmp_path / "worker.log")
        try:
            register(tmp_path, storage, "vr")

            def grab() -> None:
                done = support.run_backup(redis_url, "vr", src, timeout=120)
                assert done.returncode == 0, done.stderr
                time.sleep(1.1)  # one snapshot name per second

            grab()
            grab()  # unchanged
            (src / "file").write_bytes(b"two\n" * 1000)
            (src / "other").write_bytes(os.urandom(3 * MiB))
            grab()  # new content
            os.chmod(src / "file", 0o600)
            grab()  # metadata only
            rows = json.loads(subprocess.run(
                [support.BAKGRAB, "versions", "--storage", str(storage), "--name", "vr", "file",
                 "--json"], capture_output=True, text=True, check=True, timeout=60).stdout)
            assert [r["changed"] for r in rows] == [True, False, True, True], rows
            listing = json.loads(subprocess.run(
                [support.BAKGRAB, "list", "--storage", str(storage), "--json"],
                capture_output=True, text=True, check=True, timeout=60).stdout)
            snaps = {s["snapshot"]: s for s in listing[0]["snapshots"]}
            names = [p.name for p in support.snapshots(storage, "vr")]
            # the 3 MiB of "other" of the first content: shared by snapshots 1 and 2
            assert snaps[names[0]]["alone_bytes"] < 1 * MiB
            assert snaps[names[2]]["alone_bytes"] < 1 * MiB  # shared with snapshot 4
            # the name alone: two contents of "other", each counted once
            assert 6 * MiB <= listing[0]["alone_bytes"] < 7 * MiB, listing[0]
            into = tmp_path / "into"
            done = restore(redis_url, "vr", into, "file", snapshot=names[1])
            assert done.returncode == 0, done.stderr
            assert (into / "file").read_bytes() == b"one\n" * 1000
        finally:
            worker.stop()


def test_hard_link_groups_that_change_between_backups(tmp_path: Path, redis_url: str) -> None:
    """rsync --inplace writes into the inode it finds: two paths linked in the
    previous snapshot but no longer on the client must not share a write
    (measured: the second file's content showed at the first's path). After
    the client splits a group, rewrites both, copies a linked file and links
    a new path, each snapshot is identical to its source with the client's
    link structure, and the older snapshot kept its own contents."""
    with btrfs_mount() as mnt:
        storage = mnt / "storage"
        src = tmp_path / "src"
        src.mkdir()
        (src / "a").write_bytes(b"A" * 10_000)
        os.link(src / "a", src / "b")
        (src / "c").write_bytes(b"C" * 10_000)
        os.link(src / "c", src / "d")
        worker = support.start_worker(storage, redis_url, tmp_path / "worker.log")
        try:
            def grab() -> Path:
                done = support.run_backup(redis_url, "hl", src, timeout=120)
                assert done.returncode == 0, done.stderr
                time.sleep(1.1)
                return support.snapshots(storage, "hl")[-1]

            s1 = grab()
            (src / "b").unlink()
            (src / "b").write_bytes(b"B" * 12_000)
            (src / "a").write_bytes(b"a" * 11_000)
            os.link(src / "a", src / "e")
            (src / "d").unlink()
            shutil.copy2(src / "c", src / "d")
            s2 = grab()
            s3 = grab()  # unchanged: the links stay as the client has them
        finally:
            worker.stop()
        for snap in (s2, s3):
            assert support.rsync_diff(src, snap) == []
            assert (snap / "a").read_bytes() == b"a" * 11_000
            assert (snap / "b").read_bytes() == b"B" * 12_000
            ino = {n: (snap / n).stat().st_ino for n in "abcde"}
            assert ino["a"] == ino["e"] != ino["b"] and ino["c"] != ino["d"]
        assert (s1 / "a").read_bytes() == (s1 / "b").read_bytes() == b"A" * 10_000
        assert (s1 / "a").stat().st_ino == (s1 / "b").stat().st_ino


def doctor_lines(storage: Path, user: str) -> tuple[int, dict[str, str]]:
    done = subprocess.run(
        support.as_user(user, [support.BAKGRAB, "doctor", "--role", "worker", "--storage",
                               str(storage)], WORKER_CAPS),
        capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("BAKGRAB_")}
        | {"BAKGRAB_CONFIG": os.devnull})
    lines = {}
    for line in done.stdout.splitlines():
        level, _, rest = line.partition("  ")
        what, _, detail = rest.partition(": ")
        lines[what.strip()] = f"{level.strip()} {detail}"
    return done.returncode, lines


@pytest.mark.parametrize("options", ["user_subvol_rm_allowed", "defaults"])
def test_doctor_checks_the_btrfs_mount_and_what_the_worker_may_do(shared_tmp: Path,
                                                                  options: str) -> None:
    """`bakgrab doctor --role worker`, as the unprivileged worker user: on a
    btrfs mounted user_subvol_rm_allowed it says the backend is btrfs and its
    live probe (subvolume, read-only snapshot, both deleted) passes, leaving
    nothing behind; mounted without it, doctor fails (exit 2) naming the
    option, and the probe's delete fails (EPERM)."""
    with btrfs_mount(options=options) as mnt, worker_user(shared_tmp) as (wuser, _):
        storage = storage_for(mnt, wuser)
        import pwd

        pw = pwd.getpwnam(wuser)
        for sub in (".bakgrab", ".bakgrab/run"):
            (storage / sub).mkdir(mode=0o700)
            os.chown(storage / sub, pw.pw_uid, pw.pw_gid)
        code, lines = doctor_lines(storage, wuser)
        assert lines["storage backend"].startswith("ok btrfs"), lines
        if options == "defaults":
            assert code == 2
            assert lines["btrfs mount"].startswith("FAIL") and \
                "user_subvol_rm_allowed" in lines["btrfs mount"], lines
            assert lines["btrfs snapshots"].startswith("FAIL") and "EPERM" in \
                lines["btrfs snapshots"], lines
        else:
            assert "btrfs mount" not in lines, lines
            assert lines["btrfs snapshots"].startswith("ok"), lines
        assert "btrfs quotas" in lines
        assert list((storage / ".bakgrab" / "run").iterdir()) == []


def test_list_reads_quota_groups_when_quotas_are_on(tmp_path: Path, redis_url: str) -> None:
    """With btrfs quotas enabled (by root, as deploy/README.md says), `bakgrab
    list` gives each snapshot the quota group's exclusive bytes: the first of
    two snapshots holds alone the 4 MiB file the second no longer has, the
    second only what changed (well under 1 MiB of the unchanged 8 MiB)."""
    with btrfs_mount() as mnt:
        subprocess.run(["btrfs", "quota", "enable", str(mnt)], check=True, timeout=60)
        storage = mnt / "storage"
        src = tmp_path / "src"
        src.mkdir()
        (src / "stays").write_bytes(os.urandom(8 * MiB))
        (src / "goes").write_bytes(os.urandom(4 * MiB))
        worker = support.start_worker(storage, redis_url, tmp_path / "worker.log")
        try:
            for _ in range(2):
                done = support.run_backup(redis_url, "qg", src, timeout=120)
                assert done.returncode == 0, done.stderr
                (src / "goes").unlink(missing_ok=True)
                time.sleep(1.1)
        finally:
            worker.stop()
        btrfs.settle(mnt)
        assert btrfs.quotas_consistent(mnt)
        s1, s2 = support.snapshots(storage, "qg")
        listing = json.loads(subprocess.run(
            [support.BAKGRAB, "list", "--storage", str(storage), "--json"],
            capture_output=True, text=True, check=True, timeout=60).stdout)
        alone = {s["snapshot"]: s["alone_bytes"] for s in listing[0]["snapshots"]}
        assert alone[s1.name] == btrfs.exclusive_bytes(s1)
        assert 4 * MiB <= alone[s1.name] < 5 * MiB, alone
        assert alone[s2.name] < 1 * MiB, alone


def test_a_file_verify_found_bad_is_pulled_anew_not_carried(tmp_path: Path,
                                                             redis_url: str) -> None:
    """Bit rot in the newest of two snapshots (one byte flipped, size and
    mtime kept) is found by `bakgrab verify` (exit 14) in that snapshot only,
    though both share the file's inode number; the next grab, which starts from a
    snapshot of that newest, does not carry the bad file over (rsync's quick
    check would keep it) but pulls it anew: its bytes are the client's, its
    hard link kept."""
    from tests.integration.test_verify import EXIT_DAMAGED, flip_byte, make_tree, verify

    with btrfs_mount() as mnt:
        storage = mnt / "storage"
        src = tmp_path / "src"
        make_tree(src)
        worker = support.start_worker(storage, redis_url, tmp_path / "worker.log")
        try:
            def grab() -> Path:
                done = support.run_backup(redis_url, "bv", src, timeout=120)
                assert done.returncode == 0, done.stderr
                time.sleep(1.1)
                return support.snapshots(storage, "bv")[-1]

            # Two snapshots: the newer keeps the older's inode numbers (a
            # snapshot of it), but a write to it copies the block, so the
            # older copy stays good. verify reads each snapshot's file itself
            # (issue 15 on btrfs) and blames only the newer.
            older = grab()
            newest = grab()
            victim = newest / "d/deep/victim"
            assert victim.stat().st_ino == (older / "d/deep/victim").stat().st_ino
            btrfs.set_readonly(newest, False)
            flip_byte(victim)
            btrfs.set_readonly(newest, True)
            code, found = verify(storage, "--name", "bv")
            assert code == EXIT_DAMAGED, found
            assert [b["snapshots"] for b in found["bad"]] == [[newest.name]], found["bad"]
            healed = grab()
        finally:
            worker.stop()
        good = (src / "d/deep/victim").read_bytes()
        assert (newest / "d/deep/victim").read_bytes() != good
        assert (healed / "d/deep/victim").read_bytes() == good
        assert (healed / "victim-link").stat().st_ino == (healed / "d/deep/victim").stat().st_ino
        assert support.rsync_diff(src, healed) == []


def test_prune_removes_an_abandoned_inprogress_subvolume(shared_tmp: Path) -> None:
    """An in-progress subvolume of a grab abandoned long ago (root-owned, as
    the client's tree is) is removed by `bakgrab prune` run as the
    unprivileged worker user: renamed into the trash and deleted as a
    subvolume; nothing is left in the trash."""
    from bakgrab.worker.storage import Storage

    with btrfs_mount() as mnt, worker_user(shared_tmp) as (wuser, _):
        storage = storage_for(mnt, wuser)
        import pwd

        pw = pwd.getpwnam(wuser)
        store = Storage(storage).prepare()
        for dirpath, _dirs, _files in os.walk(store.state):
            os.chown(dirpath, pw.pw_uid, pw.pw_gid)
        left = store.inprogress("gone")
        btrfs.create(left)
        (left / "etc").mkdir(mode=0o700)
        (left / "etc" / "shadow").write_bytes(b"x" * 100_000)
        os.chmod(left, 0o755)
        old = time.time() - 86400
        os.utime(left, (old, old))
        done = subprocess.run(
            support.as_user(wuser, [support.BAKGRAB, "prune", "--storage", str(storage),
                                    "--min-free-abs", "1M", "--json"], WORKER_CAPS),
            capture_output=True, text=True, timeout=120,
            env={k: v for k, v in os.environ.items() if not k.startswith("BAKGRAB_")}
            | {"BAKGRAB_CONFIG": os.devnull, "BAKGRAB_STALE_INPROGRESS_AGE": "60"})
        assert done.returncode == 0, done.stderr
        removed = json.loads(done.stdout)["removed"]
        assert [r["snapshot"] for r in removed] == ["in-progress gone"], removed
        assert not os.path.lexists(left)
        assert list(store.trash.iterdir()) == []
