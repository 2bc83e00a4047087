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


@pytest.fixture
def backed_up(tmp_path: Path, redis_url: str, storage: Path,
              worker: support.Proc) -> tuple[Path, Path]:
    need_root()
    src = tmp_path / "src"
    support.build_fidelity_tree(src)
    os.symlink("/etc", src / "escape")
    done = support.run_backup(redis_url, "host-r", src)
    assert done.returncode == 0, done.stderr
    return src, support.snapshots(storage, "host-r")[0]


def test_restore_file_dir_and_whole_snapshot_with_metadata(
    tmp_path: Path, redis_url: str, backed_up: tuple[Path, Path]
) -> None:
    """A file, a directory and the whole snapshot come back into the staging
    dir identical in content, owners, modes, ACLs, xattrs, hard and symlinks,
    FIFOs and device nodes (these only in a staging dir no one else enters)."""
    src, snap = backed_up
    one = tmp_path / "one"
    one.mkdir()
    done = restore(redis_url, "host-r", one, "secret/shadow")
    assert done.returncode == 0, done.stderr
    assert (one / "secret" / "shadow").read_bytes() == b"root-only\n"
    assert (one / "secret" / "shadow").stat().st_mode & 0o777 == 0o600
    assert json.loads(done.stdout)["snapshot"] == snap.name

    two = tmp_path / "two"
    two.mkdir(mode=0o755)
    done = restore(redis_url, "host-r", two, "data")
    # rrsync -wo does not create devices and FIFOs (--drop-D); the client makes
    # them from the worker's list, device nodes only in a private staging dir
    assert done.returncode == 1, done.stderr
    assert "chmod 700" in done.stderr
    assert json.loads(done.stdout)["specials_skipped"] == ["data/null-dev"]
    assert support.rsync_diff(src / "data", two / "data", "--exclude=*.log",
                              "--exclude=null-dev") == []
    assert not (two / "data" / "null-dev").exists()

    whole = tmp_path / "whole"
    whole.mkdir(mode=0o700)
    done = restore(redis_url, "host-r", whole, ".", snapshot=snap.name)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["specials_created"] == 2
    assert support.rsync_diff(snap, whole, "--exclude=/") == []
    assert os.stat(whole / "data" / "null-dev").st_rdev == os.makedev(1, 3)
    assert os.readlink(whole / "escape") == "/etc"  # a symlink, not /etc's contents


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
    assert done.returncode == 5, done.stderr
    assert "restores go only to the host that made the backups" in done.stderr
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
