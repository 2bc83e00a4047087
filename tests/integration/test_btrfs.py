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
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bakgrab.tasks.caps import CLIENT_CAPS, WORKER_CAPS
from bakgrab.worker import btrfs
from tests import support
from tests.conftest import need_root
from tests.integration.test_faults import FAST, rsync_pids

pytestmark = [pytest.mark.integration, pytest.mark.root]

MiB = 1 << 20


@contextlib.contextmanager
def btrfs_mount(size: str = "1G", options: str = "user_subvol_rm_allowed") -> Iterator[Path]:
    """A fresh btrfs in a loop image, mounted; unmounted and removed after,
    also when setting it up fails half way."""
    need_root()
    if shutil.which("mkfs.btrfs") is None:
        pytest.fail("mkfs.btrfs is missing: run deploy/install-deps.sh --test (btrfs-progs)")
    base = Path(tempfile.mkdtemp(prefix="bakgrab-btrfs-"))
    os.chmod(base, 0o755)
    image, mnt = base / "img", base / "mnt"
    mounted = False
    try:
        with open(image, "wb") as f:
            f.truncate(support_size(size))
        subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True,
                       timeout=60)
        mnt.mkdir()
        subprocess.run(["mount", "-o", f"loop,{options}", str(image), str(mnt)], check=True,
                       timeout=60)
        mounted = True
        yield mnt
    finally:
        if mounted:
            done = subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60)
            if done.returncode != 0:  # a process of a failed test may still hold it
                subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def support_size(size: str) -> int:
    from bakgrab.tasks.config import parse_size

    return parse_size(size)


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
        assert (s2 / "secret" / "shadow").stat().st_uid == 0
        assert not list((storage / ".bakgrab" / "inprogress").iterdir())
