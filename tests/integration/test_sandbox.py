"""A hostile client cannot make the worker's rsync read or link files outside
its own name (issue 11, attack 1), with a real client serving crafted trees.

Grab 1 of the attacker's name stores symlinks into the backup host: a plain
dir of the host, another name's snapshot, the storage's state dir (request
key). Grab 2 sends real dirs of the same names holding files with the size,
mtime (to the ns), mode and owner of the files behind those links. Unconfined,
rsync's receiver resolves ``LINKDEST/d/secret`` through the stored symlink and
hard-links the host's own file into the attacker's snapshot (the control test
below shows it does). Confined by Landlock, it transfers the client's bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import support
from tests.conftest import need_root

pytestmark = [pytest.mark.integration, pytest.mark.root]


def mimic(fake: Path, real: Path, content: bytes | None = None) -> None:
    """``fake``: a file with ``real``'s size, mtime (ns), mode and owner and
    other bytes (or ``content``, of another size)."""
    st = real.stat()
    fake.parent.mkdir(parents=True, exist_ok=True)
    fake.write_bytes(content if content is not None else b"F" * st.st_size)
    os.chown(fake, st.st_uid, st.st_gid)
    os.chmod(fake, st.st_mode & 0o7777)
    os.utime(fake, ns=(st.st_atime_ns, st.st_mtime_ns))


def atime_is_kept_up(probe: Path) -> bool:
    """Whether a read updates atime here (relatime: when atime <= mtime)."""
    probe.write_bytes(b"probe")
    os.utime(probe, ns=(1_000_000_000, 2_000_000_000))
    probe.read_bytes()
    return probe.stat().st_atime_ns != 1_000_000_000


def attack(tmp_path: Path, redis_url: str, storage: Path) -> dict[str, object]:
    """Run the two grabs of the attack against a victim's snapshot, a host dir
    and the state dir; what the attacker's second snapshot holds."""
    host_dir = tmp_path / "host-only"
    host_dir.mkdir()
    (host_dir / "secret").write_bytes(b"HOST SECRET, never for a client\n")
    (host_dir / "other").write_bytes(b"read me and the atime tells\n")
    # relatime updates atime on a read when atime <= mtime: a basis read shows
    os.utime(host_dir / "other", ns=(1_000_000_000, 2_000_000_000))

    victim_src = tmp_path / "victim-src"
    (victim_src / "v").mkdir(parents=True)
    (victim_src / "v" / "secret.txt").write_bytes(b"the victim's own data\n")
    done = support.run_backup(redis_url, "victim", victim_src)
    assert done.returncode == 0, done.stderr
    victim_snap = support.snapshots(storage, "victim")[0]
    request_key = storage / ".bakgrab" / "request.key"
    assert request_key.is_file()

    targets = {"d/secret": host_dir / "secret", "v/secret.txt": victim_snap / "v" / "secret.txt",
               "k/request.key": request_key}
    before = {rel: (p.stat().st_ino, p.stat().st_nlink, p.read_bytes())
              for rel, p in targets.items()}

    first = tmp_path / "grab1"
    first.mkdir()
    os.symlink(host_dir, first / "d")
    os.symlink(victim_snap / "v", first / "v")
    os.symlink(storage / ".bakgrab", first / "k")
    done = support.run_backup(redis_url, "mallory", first)
    assert done.returncode == 0, done.stderr

    second = tmp_path / "grab2"
    for rel, real in targets.items():
        mimic(second / rel, real)
    # a wrong size and mtime: rsync would open the host file as a delta basis
    mimic(second / "d" / "other", host_dir / "other", b"a different length entirely\n" * 3)
    done = support.run_backup(redis_url, "mallory", second, "--json")
    # Confined, rsync's receiver reports each refused link-dest lookup as an
    # error (exit 23) and transfers the file instead: a partial snapshot of
    # the attacker's own name. Unconfined, the links succeed (exit 0).
    assert done.returncode in (0, 1), done.stderr
    result = json.loads(done.stdout)
    assert result["partial"] is (done.returncode == 1)
    snap = storage / result["snapshot"]
    return {"snap": snap, "targets": targets, "before": before, "second": second,
            "other": host_dir / "other"}


def test_stored_symlinks_lead_rsync_nowhere(tmp_path: Path, redis_url: str, storage: Path,
                                            worker: support.Proc) -> None:
    """The attacker's second snapshot holds the bytes its client sent, in
    inodes of its own; no target gained a link or was read; the victim's
    snapshot is unchanged and the worker goes on serving."""
    need_root()
    assert atime_is_kept_up(tmp_path / "probe"), "this filesystem does not update atime"
    seen = attack(tmp_path, redis_url, storage)
    snap, second = seen["snap"], seen["second"]
    assert isinstance(snap, Path) and isinstance(second, Path)
    targets: dict[str, Path] = seen["targets"]  # type: ignore[assignment]
    before: dict[str, tuple[int, int, bytes]] = seen["before"]  # type: ignore[assignment]
    for rel, real in targets.items():
        got = snap / rel
        assert got.read_bytes() == (second / rel).read_bytes(), rel
        assert got.stat().st_ino != real.stat().st_ino, f"{rel} is the host's own inode"
        ino, nlink, content = before[rel]
        assert (real.stat().st_ino, real.stat().st_nlink, real.read_bytes()) == (
            ino, nlink, content), f"{real} changed"
    assert (snap / "d" / "other").read_bytes() == (second / "d" / "other").read_bytes()
    other = seen["other"]
    assert isinstance(other, Path)
    assert other.stat().st_atime_ns == 1_000_000_000, "rsync read the host file as a basis"

    victim = tmp_path / "victim-src"
    (victim / "v" / "more.txt").write_bytes(b"after the attack\n")
    done = support.run_backup(redis_url, "victim", victim)
    assert done.returncode == 0, done.stderr
    newest = support.snapshots(storage, "victim")[-1]
    assert support.rsync_diff(victim, newest) == []


def test_without_the_sandbox_the_attack_works(tmp_path: Path, redis_url: str,
                                              storage: Path) -> None:
    """Control: with ``sandbox = off`` the same grabs hard-link the host's own
    file into the attacker's snapshot. This is what the sandbox stops, and
    it shows the test above can fail."""
    need_root()
    proc = support.start_worker(storage, redis_url, tmp_path / "worker.log",
                                env=support.worker_env(sandbox="off"))
    try:
        assert "rsync runs unconfined" in proc.text()
        seen = attack(tmp_path, redis_url, storage)
    finally:
        proc.stop()
    snap = seen["snap"]
    targets: dict[str, Path] = seen["targets"]  # type: ignore[assignment]
    assert isinstance(snap, Path)
    leaked = snap / "d" / "secret"
    assert leaked.stat().st_ino == targets["d/secret"].stat().st_ino
    assert leaked.read_bytes() == b"HOST SECRET, never for a client\n"


def test_worker_refuses_storage_inside_a_sandbox_tree(tmp_path: Path, redis_url: str) -> None:
    """A storage under /usr would be readable by every confined rsync: the
    worker refuses to start (exit 3, one line, no traceback)."""
    need_root()
    storage = Path("/usr/local") / f"bakgrab-test-{os.getpid()}"
    storage.mkdir()
    try:
        done = subprocess.run(
            [support.BAKGRAB, "worker", "--storage", str(storage), "--broker", redis_url],
            capture_output=True, text=True, timeout=60, env=support.worker_env())
    finally:
        shutil.rmtree(storage)
    assert done.returncode == 3, done.stderr
    assert "lies inside /usr" in done.stderr and "Traceback" not in done.stderr
