"""Exit codes 7, 8 and 12 end to end: real redis-server, worker, clients and
the programs they run, each code from the situation tasks/errors.py gives it
(issue 13: documented codes no test reached).

* 7, Busy: a second grab of a name while the first still pulls, retried
  as a transient failure, then final; the first one is not disturbed;
* 8, TransferFailed: a pull that retrying cannot fix (a storage path that
  rsync's ``-e`` cannot carry), failed at once, not retried;
* 12, ProgramFailed: a program the client needs is not installed, and a
  program the backup host runs exits non-zero (``rm`` refusing to cross into
  a mount inside a snapshot that ``bakgrab prune`` removes).

Each asserts the code, the one-line message and what the failure left
(snapshots, the failure record, temp dirs).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import support
from tests.conftest import need_root

pytestmark = pytest.mark.integration


def failures(storage: Path, name: str) -> list[dict[str, object]]:
    path = storage / ".bakgrab" / "failures" / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def one_line(stderr: str) -> str:
    """The error's one line: no traceback without --debug."""
    lines = [line for line in stderr.splitlines() if line.startswith("bakgrab: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@contextlib.contextmanager
def started(argv: list[str], err: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A client process in its own group, killed by pid at the end."""
    with open(err, "wb") as out:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=out,
                                start_new_session=True, env=env)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_busy_name_exits_7(tmp_path: Path, redis_url: str, storage: Path) -> None:
    """While a slow grab of a name pulls, a second backup of the same name
    finds its lock held: Busy, transient, so retried (max_retries 2, fast
    backoff), then failed for good: the client exits 7 with the worker's
    message; the failure is recorded with exit code 7; the first grab still
    pulls and then completes the only snapshot."""
    worker = support.start_worker(storage, redis_url, tmp_path / "worker.log",
                                  env=support.worker_env(bwlimit="200K", max_retries="2"))
    try:
        src = tmp_path / "src"
        src.mkdir()
        (src / "big").write_bytes(os.urandom(3 << 20))  # about 15 s at 200K
        argv = [support.BAKGRAB, "backup", "--broker", redis_url, "--name", "busy", "--source",
                str(src), "--json"]
        with started(argv, tmp_path / "first.err", dict(os.environ)) as first:
            support.wait_for(lambda: any(support.comm(p) == "rsync"
                                         for p in support.descendants(worker.pid)),
                             30, "the first grab's rsync")
            second = support.run_backup(redis_url, "busy", src, timeout=60)
            assert second.returncode == 7, second.stderr
            assert one_line(second.stderr) == (
                "bakgrab: error: name busy is busy: another grab holds it")
            assert first.poll() is None  # not disturbed
            [record] = failures(storage, "busy")
            assert record["error"] == "Busy" and record["exit_code"] == 7
            assert worker.text().count("is busy: another grab holds it") >= 3  # 1 + 2 retries
            assert first.wait(90) == 0, (tmp_path / "first.err").read_text()
        [snap] = support.snapshots(storage, "busy")
        assert (snap / "big").read_bytes() == (src / "big").read_bytes()
    finally:
        worker.stop()


def test_a_pull_that_cannot_work_exits_8(tmp_path: Path, redis_url: str) -> None:
    """A storage path holding a single quote cannot be passed in rsync's
    ``-e`` string: TransferFailed, not retried (one attempt, though the worker
    allows 3 retries), the client exits 8 saying why, without the backup
    host's path (the client never learns the storage's layout); nothing is
    published and the failure is recorded with code 8."""
    storage = tmp_path / "it's storage"
    worker = support.start_worker(storage, redis_url, tmp_path / "worker.log")
    try:
        src = tmp_path / "src"
        src.mkdir()
        (src / "f").write_text("x")
        done = support.run_backup(redis_url, "eight", src, timeout=60)
        assert done.returncode == 8, done.stderr + worker.text()[-3000:]
        line = one_line(done.stderr)
        assert "contains a single quote, which rsync -e cannot carry" in line
        assert str(storage) not in done.stderr and "it's storage" in worker.text()
        assert support.snapshots(storage, "eight") == []
        [record] = failures(storage, "eight")
        assert record["error"] == "TransferFailed" and record["exit_code"] == 8
        assert worker.text().count("bakgrab.grab[") and "retry" not in worker.text().lower()
    finally:
        worker.stop()


def test_a_missing_client_program_exits_12(tmp_path: Path) -> None:
    """On a client without rrsync (every other program on PATH), `bakgrab
    backup` exits 12 naming the program and what to do, before it sends a
    job (the broker need not even exist), its temp dir removed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for entry in os.scandir("/usr/bin"):
        if entry.name != "rrsync":
            (bin_dir / entry.name).symlink_to(entry.path)
    assert not (bin_dir / "rrsync").exists()
    src = tmp_path / "src"
    src.mkdir()
    tmp = tmp_path / "client-tmp"
    tmp.mkdir()
    env = {**os.environ, "PATH": str(bin_dir), "TMPDIR": str(tmp)}
    done = support.run_backup("redis://127.0.0.1:1/0", "twelve", src, env=env, timeout=60)
    assert done.returncode == 12, done.stderr
    assert one_line(done.stderr) == "bakgrab: error: rrsync not found; install it (see README)"
    assert list(tmp.iterdir()) == []


def test_a_failing_program_on_the_backup_host_exits_12(
    tmp_path: Path, redis_url: str, storage: Path, worker: support.Proc
) -> None:
    """`bakgrab prune` removing a snapshot with a file system mounted inside
    it (rm -rf --one-file-system refuses to cross into it, exit 1):
    ProgramFailed, exit 12, rm's own words in the one line; the mounted file
    system's contents are untouched."""
    need_root()
    src = tmp_path / "src"
    src.mkdir()
    (src / "d").mkdir()
    (src / "f").write_text("x")
    for _ in range(2):
        done = support.run_backup(redis_url, "mounted", src)
        assert done.returncode == 0, done.stderr
    old, _new = support.snapshots(storage, "mounted")
    mnt = old / "d"
    # the snapshot moves (to the trash) while the mount stays: found again by
    # a source name that is this test's own
    source = f"bakgrab-exit12-{uuid.uuid4().hex[:12]}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", source, str(mnt)],
                   check=True, timeout=30)
    try:
        (mnt / "on-the-mount").write_text("kept")
        done = subprocess.run([support.BAKGRAB, "prune", "--storage", str(storage),
                               "--keep-last", "1"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 12, done.stdout + done.stderr
        line = one_line(done.stderr)
        assert line.startswith("bakgrab: error: ionice exited with 1: rm: skipping "), line
        assert "since it's on a different device" in line
        mounted = [m.split()[1] for m in Path("/proc/self/mounts").read_text().splitlines()
                   if m.split()[0] == source]
        [where] = mounted
        assert (Path(where) / "on-the-mount").read_text() == "kept"
    finally:
        for m in Path("/proc/self/mounts").read_text().splitlines():
            if m.split()[0] == source:
                subprocess.run(["umount", m.split()[1].encode().decode("unicode_escape")],
                               check=False, timeout=30)
