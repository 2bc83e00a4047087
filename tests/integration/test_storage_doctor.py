"""`bakgrab doctor --role worker` on real mounts: STORAGE holds hostile files
as sent (device nodes, setuid files; issue 11, attack 11), so doctor warns
when other users can reach it and when its mount lacks nodev,nosuid."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import support
from tests.conftest import need_root

pytestmark = [pytest.mark.integration, pytest.mark.root]


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A small tmpfs mounted at ``path`` with ``options``, unmounted after."""
    need_root()
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=4m,{options}", "bakgrab-doctor",
                    str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False, timeout=30)


def doctor(storage: Path) -> tuple[int, dict[str, str]]:
    """doctor's exit code and its storage lines, by check name."""
    done = subprocess.run([support.BAKGRAB, "doctor", "--role", "worker", "--storage",
                           str(storage)], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items()
                               if not k.startswith("BAKGRAB_")} | {"BAKGRAB_CONFIG": os.devnull})
    lines = {}
    for line in done.stdout.splitlines():
        what = line[6:].split(":", 1)[0]
        if what.startswith("storage"):
            lines[what] = line
    return done.returncode, lines


def test_open_storage_on_a_mount_without_nodev_nosuid_warns(shared_tmp: Path) -> None:
    """STORAGE 0755 under dirs every user may pass, on a tmpfs mounted without
    nodev,nosuid: doctor warns about both, naming the fixes, and a device
    node really is usable there (what the warning is about)."""
    with tmpfs(shared_tmp / "plain", "mode=0755") as mnt:
        storage = mnt / "storage"
        storage.mkdir(mode=0o755)
        os.chmod(storage, 0o755)
        code, lines = doctor(storage)
        assert code == 0  # warnings, not failures
        assert lines["storage access"].startswith("warn  storage access: ")
        assert "readable by every local user" in lines["storage access"]
        assert f"chmod 700 {storage}" in lines["storage access"]
        assert lines["storage mount"].startswith("warn  storage mount: ")
        assert f"{mnt} (holding {storage}) is mounted without nodev,nosuid" in lines[
            "storage mount"]
        # the hazard: a client-sent /dev/null-like node works on this mount
        node = storage / "null"
        os.mknod(node, 0o666 | 0o020000, os.makedev(1, 3))
        with open(node, "wb") as f:
            f.write(b"x")


def test_private_storage_on_a_nodev_nosuid_mount_is_ok(shared_tmp: Path) -> None:
    """STORAGE 0700 on a nodev,nosuid tmpfs: both checks ok; a device node
    stored there cannot be opened."""
    with tmpfs(shared_tmp / "hard", "mode=0755,nodev,nosuid") as mnt:
        storage = mnt / "storage"
        storage.mkdir(mode=0o700)
        code, lines = doctor(storage)
        assert code == 0
        assert lines["storage access"] == (
            f"ok    storage access: {storage} is 0o700: no other user reaches it")
        assert lines["storage mount"] == f"ok    storage mount: {mnt} is mounted nodev,nosuid"
        node = storage / "null"
        os.mknod(node, 0o666 | 0o020000, os.makedev(1, 3))
        with pytest.raises(PermissionError):
            open(node, "wb")  # noqa: SIM115 -- must fail to open


def test_group_or_parent(shared_tmp: Path) -> None:
    """A group-readable STORAGE warns naming the group; a 0755 STORAGE inside
    a 0700 parent is closed to others by that parent (ok, saying which); one
    option missing is named alone."""
    with tmpfs(shared_tmp / "half", "mode=0755,nodev") as mnt:
        storage = mnt / "storage"
        storage.mkdir()
        os.chmod(storage, 0o750)
        _, lines = doctor(storage)
        assert lines["storage access"].startswith("warn  storage access: ")
        assert "is open to group root (0o750)" in lines["storage access"]
        assert "mounted without nosuid:" in lines["storage mount"]
        parent = mnt / "private"
        parent.mkdir()
        os.chmod(parent, 0o700)
        inner = parent / "storage"
        inner.mkdir()
        os.chmod(inner, 0o755)
        _, lines = doctor(inner)
        assert lines["storage access"] == (
            f"ok    storage access: {inner} is 0o755 but {parent} closes it to others")
