"""No root on either side: two throwaway users with ambient capabilities only."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest

from bakgrab.tasks.caps import CLIENT_CAPS, WORKER_CAPS, sets
from tests import support
from tests.conftest import need_root

pytestmark = [pytest.mark.integration, pytest.mark.root]


def test_whole_backup_as_unprivileged_users_with_capabilities(
    shared_tmp: Path, redis_url: str
) -> None:
    """A client user holding only CAP_DAC_READ_SEARCH and a worker user holding
    only the six storage capabilities back up root-owned 0600 files in 0700
    dirs, setuid binaries, device nodes and a file with security.capability:
    `rsync -naHAX --numeric-ids --checksum` finds no difference. The worker
    process itself holds nothing effective."""
    need_root()
    tag = secrets.token_hex(3)
    with support.throwaway_user(f"bkgw{tag}", shared_tmp / "whome") as w, \
            support.throwaway_user(f"bkgc{tag}", shared_tmp / "chome") as c:
        src = shared_tmp / "src"
        support.build_fidelity_tree(src)
        capfile = src / "data" / "ping-like"
        capfile.write_bytes(b"\x7fELF-ish\n")
        subprocess.run(["setcap", "cap_net_raw+ep", str(capfile)], check=True)
        storage = shared_tmp / "storage"
        storage.mkdir()
        os.chown(storage, w.pw_uid, w.pw_gid)
        os.chmod(storage, 0o750)
        state = shared_tmp / "state"
        state.mkdir()
        os.chown(state, c.pw_uid, c.pw_gid)

        worker = support.start_worker(storage, redis_url, shared_tmp / "worker.log",
                                      user=w.pw_name, caps=WORKER_CAPS)
        try:
            assert sets(str(worker.pid))["eff"] == 0
            assert sets(str(worker.pid))["amb"] != 0
            env = {"PATH": os.environ["PATH"], "HOME": str(shared_tmp),
                   "XDG_STATE_HOME": str(state)}
            done = support.run_backup(redis_url, "nr", src, "--json", env=env,
                                      user=c.pw_name, caps=CLIENT_CAPS)
        finally:
            worker.stop()
        assert done.returncode == 0, done.stderr + worker.text()[-3000:]
        assert json.loads(done.stdout)["partial"] is False
        snap = support.snapshots(storage, "nr")[0]
        assert support.rsync_diff(src, snap) == []
        assert (snap / "secret" / "shadow").stat().st_uid == 0
        got = subprocess.run(["getcap", str(snap / "data" / "ping-like")],
                             capture_output=True, text=True, check=True).stdout
        assert "cap_net_raw" in got
        assert (snap / "data" / "setuid").stat().st_mode & 0o4000
        assert "without CAP_DAC_READ_SEARCH" not in done.stderr


def test_worker_without_capabilities_says_what_is_missing(shared_tmp: Path,
                                                          redis_url: str) -> None:
    """An unprivileged worker without its capabilities refuses to start and
    names each missing one and how to grant it."""
    need_root()
    tag = secrets.token_hex(3)
    with support.throwaway_user(f"bkgw{tag}", shared_tmp / "home") as w:
        storage = shared_tmp / "storage"
        storage.mkdir()
        os.chown(storage, w.pw_uid, w.pw_gid)
        done = subprocess.run(
            support.as_user(w.pw_name, [support.BAKGRAB, "worker", "--storage", str(storage),
                                        "--broker", redis_url], ["chown"]),
            capture_output=True, text=True, timeout=60, env={"PATH": os.environ["PATH"]})
        assert done.returncode == 3
        for cap in ("dac_override", "fowner", "fsetid", "mknod", "setfcap"):
            assert cap in done.stderr
        assert "AmbientCapabilities=" in done.stderr


def test_doctor_names_what_is_missing(shared_tmp: Path) -> None:
    """`bakgrab doctor` passes for a user with the capabilities and a usable
    account, and fails naming the fix for missing capabilities, a locked
    account and a world-writable storage."""
    need_root()
    tag = secrets.token_hex(3)
    with support.throwaway_user(f"bkgd{tag}", shared_tmp / "home") as u:
        storage = shared_tmp / "storage"
        storage.mkdir(mode=0o750)
        os.chown(storage, u.pw_uid, u.pw_gid)
        env = {"PATH": os.environ["PATH"]}

        def doctor(role: str, caps: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                support.as_user(u.pw_name, [support.BAKGRAB, "doctor", "--role", role,
                                            "--storage", str(storage)], caps),
                capture_output=True, text=True, timeout=60, env=env)

        good = doctor("worker", WORKER_CAPS)
        assert good.returncode == 0, good.stdout
        assert "ok    worker capabilities" in good.stdout
        bad = doctor("worker", ())
        assert bad.returncode == 2
        assert "FAIL  worker capabilities: missing chown" in bad.stdout
        assert "AmbientCapabilities=" in bad.stdout
        os.chmod(storage, 0o777)
        assert "chmod go-w" in doctor("worker", WORKER_CAPS).stdout
        subprocess.run(["usermod", "-L", u.pw_name], check=True)
        locked = subprocess.run([support.BAKGRAB, "doctor", "--role", "client", "--user",
                                 u.pw_name], capture_output=True, text=True, env=env)
        assert locked.returncode == 2
        assert f"usermod -p '*' {u.pw_name}" in locked.stdout


def test_xattrs_the_worker_cannot_store_are_skipped_not_failed(shared_tmp: Path,
                                                               redis_url: str) -> None:
    """A root client sends trusted.* and security.* xattrs; an unprivileged
    worker (no CAP_SYS_ADMIN) skips those namespaces explicitly, keeps
    security.capability and user.*, and the snapshot is complete, not partial."""
    need_root()
    tag = secrets.token_hex(3)
    with support.throwaway_user(f"bkgw{tag}", shared_tmp / "whome") as w:
        src = shared_tmp / "src"
        src.mkdir()
        f = src / "file"
        f.write_text("x\n")
        os.setxattr(f, "trusted.bakgrab", b"needs CAP_SYS_ADMIN")
        os.setxattr(f, "user.kept", b"kept")
        subprocess.run(["setcap", "cap_net_raw+ep", str(f)], check=True)
        storage = shared_tmp / "storage"
        storage.mkdir()
        os.chown(storage, w.pw_uid, w.pw_gid)
        worker = support.start_worker(storage, redis_url, shared_tmp / "worker.log",
                                      user=w.pw_name, caps=WORKER_CAPS)
        try:
            done = support.run_backup(redis_url, "xa", src, "--json")
        finally:
            worker.stop()
        assert done.returncode == 0, done.stderr + worker.text()[-2000:]
        assert json.loads(done.stdout)["partial"] is False
        copy = support.snapshots(storage, "xa")[0] / "file"
        names = os.listxattr(copy)
        assert "trusted.bakgrab" not in names
        assert os.getxattr(copy, "user.kept") == b"kept"
        assert "security.capability" in names
