"""Restores through a write-only one-shot sshd, and the history of a path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests import support
from tests.conftest import need_root

pytestmark = pytest.mark.integration


def restore(broker: str, name: str, into: Path, *paths: str,
            snapshot: str = "latest") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [support.BAKGRAB, "restore", "--broker", broker, "--name", name, "--snapshot", snapshot,
         "--into", str(into), "--json", *paths], capture_output=True, text=True, timeout=120)


def register(tmp_path: Path, storage: Path, name: str) -> str:
    """Register this test's client (its sshd host key, made now if need be) for
    ``name`` on the backup host, as an operator does with `bakgrab trust --key`."""
    from bakgrab.client import keys

    _, line = keys.host_key(tmp_path / "state" / "bakgrab")
    subprocess.run([support.BAKGRAB, "trust", "--storage", str(storage), name, "--key", line],
                   check=True, capture_output=True, timeout=60)
    return line


@pytest.fixture
def backed_up(tmp_path: Path, redis_url: str, storage: Path,
              worker: support.Proc) -> tuple[Path, Path]:
    need_root()
    src = tmp_path / "src"
    support.build_fidelity_tree(src)
    os.symlink("/etc", src / "escape")
    register(tmp_path, storage, "host-r")
    done = support.run_backup(redis_url, "host-r", src)
    assert done.returncode == 0, done.stderr
    return src, support.snapshots(storage, "host-r")[0]


def test_restore_file_dir_and_whole_snapshot_with_metadata(
    tmp_path: Path, redis_url: str, backed_up: tuple[Path, Path]
) -> None:
    """A file, a directory and the whole snapshot come back into the staging
    dir. Into a private one (0700, ours; --into creates it so) everything is
    identical: content, owners, modes, setuid bits, ACLs, xattrs, hard and
    symlinks, FIFOs and device nodes, and the staging dir keeps its own mode.
    Into an open one, privilege stays behind (issue 12): no device node, no
    setuid bit, no other owner, no ACL, each reported, exit 1."""
    src, snap = backed_up
    one = tmp_path / "one"
    one.mkdir(mode=0o755)
    done = restore(redis_url, "host-r", one, "secret/shadow")
    assert done.returncode == 0, done.stderr
    assert (one / "secret" / "shadow").read_bytes() == b"root-only\n"
    assert (one / "secret" / "shadow").stat().st_mode & 0o777 == 0o600
    assert json.loads(done.stdout)["snapshot"] == snap.name
    assert sorted(p.name for p in one.iterdir()) == ["secret"]  # no wrapper left behind

    two = tmp_path / "two"
    two.mkdir(mode=0o755)
    done = restore(redis_url, "host-r", two, "data")
    assert done.returncode == 1, done.stderr
    out = json.loads(done.stdout)
    assert out["private"] is False
    assert out["specials_skipped"] == ["data/null-dev"]
    assert not (two / "data" / "null-dev").exists()
    stripped = {e["path"]: e["dropped"] for e in out["stripped"]}
    assert "setuid bit" in stripped["data/setuid"]
    assert any(d.startswith("owner uid") for d in stripped["data/owned-by-nobody"])
    assert "ACL" in stripped["data/acl.txt"]
    assert "default ACL" in stripped["data"]
    assert "data/file.txt" not in stripped
    assert os.stat(two / "data" / "setuid").st_mode & 0o7777 == 0o755
    assert os.stat(two / "data" / "owned-by-nobody").st_uid == 0
    assert not [n for n in os.listxattr(two / "data" / "acl.txt") if n.startswith("system.")]
    assert not [n for f in (two / "data").iterdir() if not f.is_symlink()
                for n in os.listxattr(f) if n.startswith("user.rsync.")]
    assert os.getxattr(two / "data" / "xattr.txt", "user.bakgrab.test") == b"value\x00\xff"
    assert stat_of(two / "data" / "fifo") == stat_of(src / "data" / "fifo")
    # every file here inherited data/'s default ACL, and ACLs stay behind
    assert support.rsync_diff(src / "data", two / "data", "--no-A", "--exclude=*.log",
                              "--exclude=null-dev", "--exclude=setuid",
                              "--exclude=owned-by-nobody", "--exclude=acl.txt") == []
    assert os.stat(two).st_mode & 0o7777 == 0o755

    whole = tmp_path / "whole"  # made by bakgrab: 0700
    done = restore(redis_url, "host-r", whole, ".", snapshot=snap.name)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["private"] is True and out["specials_created"] == 2
    assert out["stripped"] == [] and out["refused"] == []
    # everything but the staging dir itself, which keeps its own attributes
    assert [d for d in support.rsync_diff(snap, whole) if not d.endswith(" ./")] == []
    assert os.stat(whole / "data" / "null-dev").st_rdev == os.makedev(1, 3)
    assert os.stat(whole / "data" / "setuid").st_mode & 0o7777 == 0o4755
    assert os.readlink(whole / "escape") == "/etc"  # a symlink, not /etc's contents
    # restoring "." never gives the staging dir the snapshot root's mode or owner
    assert os.stat(snap).st_mode & 0o777 != 0o700
    assert (os.stat(whole).st_mode & 0o7777, os.stat(whole).st_uid) == (0o700, 0)


def stat_of(path: Path) -> tuple[int, int, int, int]:
    st = os.lstat(path)
    return st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns


def test_restore_cannot_leave_the_snapshot_or_the_staging_dir(
    tmp_path: Path, redis_url: str, backed_up: tuple[Path, Path]
) -> None:
    """'..' paths and paths through a symlink pointing outside the snapshot are
    refused (exit 4), and nothing is written outside the staging dir."""
    into = tmp_path / "into"
    into.mkdir()
    done = restore(redis_url, "host-r", into, "../../etc/passwd")
    assert done.returncode == 4 and "'..'" in done.stderr
    done = restore(redis_url, "host-r", into, "escape/passwd")
    assert done.returncode == 4, done.stderr
    assert "outside the snapshot" in done.stderr
    assert list(into.iterdir()) == []


def test_restore_only_to_the_pinned_host(tmp_path: Path, redis_url: str,
                                         backed_up: tuple[Path, Path]) -> None:
    """Another host (another sshd key) asking for NAME's files gets nothing."""
    shutil.rmtree(tmp_path / "state")
    into = tmp_path / "into"
    into.mkdir()
    done = restore(redis_url, "host-r", into, "secret/shadow")
    assert done.returncode == 4, done.stderr
    assert "not signed by the client registered for this name" in done.stderr
    assert list(into.iterdir()) == []


def test_write_only_gate_refuses_reads(tmp_path: Path) -> None:
    """The restore gate lets through a receiver only: a pull from it fails."""
    from bakgrab.client import keys
    from bakgrab.client.sshd import OneShotServer, ServerConfig, parse_allow

    into = tmp_path / "into"
    into.mkdir()
    (into / "f").write_text("x")
    key = keys.one_time_key()
    key_file = tmp_path / "key"
    key_file.write_text(key.private)
    key_file.chmod(0o600)
    host_key, _ = keys.host_key(tmp_path / "state")
    with OneShotServer(ServerConfig(source=into, public_key=key.public,
                                    allow=parse_allow("127.0.0.1"), host_key=host_key,
                                    listen="127.0.0.1", mode="wo")) as srv:
        ssh = (f"ssh -F /dev/null -p {srv.port} -i {key_file} -o BatchMode=yes "
               "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null")
        pull = subprocess.run(["rsync", "-a", "-e", ssh, "root@127.0.0.1:/", f"{tmp_path}/out/"],
                              capture_output=True, text=True, timeout=30)
        assert pull.returncode != 0
        assert not (tmp_path / "out" / "f").exists()
        push = subprocess.run(["rsync", "-a", "-e", ssh, str(key_file), "root@127.0.0.1:/k"],
                              capture_output=True, text=True, timeout=30)
        assert push.returncode == 0, push.stderr
        assert (into / "k").exists()
        assert "refused" in srv.gate_log.read_text()


def test_versions_follow_a_file_through_its_history(
    tmp_path: Path, redis_url: str, storage: Path, worker: support.Proc
) -> None:
    """`bakgrab versions` lists every snapshot with the file: present or not,
    and changed or the same inode as before."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "keep").write_text("k")
    register(tmp_path, storage, "hist")
    for content in ("v1", "same", None, "v2"):
        if content is None:
            (src / "f").unlink()
        elif content != "same":
            (src / "f").write_text(content)
        assert support.run_backup(redis_url, "hist", src).returncode == 0
        time.sleep(1.05)
    out = subprocess.run([support.BAKGRAB, "versions", "--storage", str(storage), "--name",
                          "hist", "--json", "f"], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    assert [r["present"] for r in rows] == [True, True, False, True]
    assert [r.get("changed") for r in rows] == [True, False, None, True]
    assert rows[0]["inode"] == rows[1]["inode"] != rows[3]["inode"]
    assert rows[3]["size"] == 2
