"""One backup end to end: real redis-server, Celery worker, sshd, ssh and rsync."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest
import redis

from tests import support
from tests.conftest import need_root

pytestmark = pytest.mark.integration

EXCLUDES = "/cache\n*.log\n# a comment\n\n"


def test_backup_keeps_every_file_and_its_metadata(
    tmp_path: Path, redis_url: str, storage: Path, worker: support.Proc
) -> None:
    """A backup of a tree with every kind of file is identical by
    `rsync -naHAX --numeric-ids --checksum`; excluded paths are absent; the run's
    excludes and statistics are recorded beside the snapshot, not inside it."""
    need_root()
    src = tmp_path / "src"
    support.build_fidelity_tree(src)
    excl = tmp_path / "excludes"
    excl.write_text(EXCLUDES)

    done = support.run_backup(redis_url, "host-a", src, "--exclude-from", str(excl), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    snaps = support.snapshots(storage, "host-a")
    assert [s.name for s in snaps] == [result["snapshot"]]
    snap = snaps[0]

    assert support.rsync_diff(src, snap, "--exclude=/cache", "--exclude=*.log") == []
    assert not (snap / "cache").exists()
    assert not (snap / "data" / "skip.log").exists()
    assert (snap / "secret" / "shadow").read_bytes() == b"root-only\n"
    assert stat.S_IMODE((snap / "secret").stat().st_mode) == 0o700
    assert (snap / "data" / "file.txt").stat().st_ino == (snap / "data" / "hardlink.txt").stat().st_ino
    assert os.readlink(snap / "data" / "dangling") == "/nonexistent/target"
    assert stat.S_ISFIFO((snap / "data" / "fifo").lstat().st_mode)
    assert stat.S_ISCHR((snap / "data" / "null-dev").lstat().st_mode)
    assert (snap / "data" / "setuid").stat().st_mode & stat.S_ISUID
    assert os.getxattr(snap / "data" / "xattr.txt", "user.bakgrab.test") == b"value\x00\xff"
    assert (snap / "data" / "owned-by-nobody").stat().st_uid == (
        src / "data" / "owned-by-nobody").stat().st_uid
    acl = subprocess.run(["getfacl", "-cp", str(snap / "data" / "acl.txt")],
                         capture_output=True, text=True, check=True).stdout
    assert "user:nobody:r--" in acl
    assert (snap / os.fsdecode(b"bad-\xff\xfe-utf8")).exists()
    assert (snap / "new\nline").exists()
    sparse = (snap / "sparse.img").stat()
    assert sparse.st_size == 64 << 20 and sparse.st_blocks * 512 < 1 << 20

    assert result["files"] > 10 and result["bytes_transferred"] > 0
    assert result["warnings"] == [] and result["partial"] is False
    meta_dir = storage / ".bakgrab" / "meta"
    meta = json.loads((meta_dir / f"{snap.name}.json").read_text())
    assert meta["rsync_exit"] == 0
    assert meta["stats"]["files"] == result["files"]
    assert meta["host_key_fingerprint"].startswith("SHA256:")
    assert meta["excludes"] == ["/cache", "*.log"]
    assert (meta_dir / f"{snap.name}.exclude").read_text() == "- /cache\n- *.log\n"
    assert not list(snap.glob(".bakgrab*"))
    # the one-time key file is gone once the job ended
    assert list((storage / ".bakgrab" / "run").iterdir()) == []

    listing = subprocess.run([support.BAKGRAB, "list", "--storage", str(storage), "--json"],
                             capture_output=True, text=True, check=True)
    names = json.loads(listing.stdout)
    assert [n["name"] for n in names] == ["host-a"]
    assert names[0]["snapshots"][0]["snapshot"] == snap.name


def test_second_backup_hard_links_unchanged_files(
    tmp_path: Path, redis_url: str, storage: Path, worker: support.Proc
) -> None:
    """A second backup of an unchanged tree links every file to the first
    snapshot (same inode) and adds only directories; a changed file gets a new
    inode."""
    src = tmp_path / "src"
    (src / "d1" / "d2").mkdir(parents=True)
    for i in range(50):
        (src / "d1" / f"f{i}").write_bytes(os.urandom(2000))
    (src / "d1" / "d2" / "changes").write_text("one\n")

    first = support.run_backup(redis_url, "host-b", src)
    assert first.returncode == 0, first.stderr
    assert "host-b: snapshot host-b." in first.stdout
    (src / "d1" / "d2" / "changes").write_text("two\n")
    second = support.run_backup(redis_url, "host-b", src)
    assert second.returncode == 0, second.stderr

    old, new = support.snapshots(storage, "host-b")
    for i in range(50):
        a, b = (old / "d1" / f"f{i}").stat(), (new / "d1" / f"f{i}").stat()
        assert a.st_ino == b.st_ino and b.st_nlink == 2
    assert (old / "d1" / "d2" / "changes").stat().st_ino != (new / "d1" / "d2" / "changes").stat().st_ino
    assert (new / "d1" / "d2" / "changes").read_text() == "two\n"
    assert (old / "d1").stat().st_ino != (new / "d1").stat().st_ino
    meta = json.loads((storage / ".bakgrab" / "meta" / f"{new.name}.json").read_text())
    assert meta["link_dest"] == old.name
    assert meta["stats"]["files_transferred"] == 1


def test_a_file_rewritten_within_the_same_second_is_not_linked(
    tmp_path: Path, redis_url: str, storage: Path, worker: support.Proc
) -> None:
    """A file rewritten at the same size within the same second as the
    previous backup saw it (mtimes 0.1 s and 0.6 s into one second, set to
    the nanosecond so the test does not depend on how fast it runs) is copied
    anew, not hard-linked with its old content: rsync compares mtimes to the
    nanosecond (--modify-window=-1, issue 13). An unchanged file beside it is
    still linked, so the comparison is the only difference."""
    src = tmp_path / "src"
    src.mkdir()
    second = 1_700_000_000 * 10**9
    rewritten, same = src / "rewritten", src / "same"
    rewritten.write_bytes(b"A" * 4096)
    same.write_bytes(b"S" * 4096)
    os.utime(rewritten, ns=(second + 100_000_000, second + 100_000_000))
    os.utime(same, ns=(second, second))
    first = support.run_backup(redis_url, "host-w", src)
    assert first.returncode == 0, first.stderr
    [old] = support.snapshots(storage, "host-w")
    assert (old / "rewritten").stat().st_mtime_ns == second + 100_000_000

    rewritten.write_bytes(b"B" * 4096)
    os.utime(rewritten, ns=(second + 600_000_000, second + 600_000_000))
    again = support.run_backup(redis_url, "host-w", src)
    assert again.returncode == 0, again.stderr
    old, new = support.snapshots(storage, "host-w")
    assert (new / "rewritten").read_bytes() == b"B" * 4096
    assert (old / "rewritten").read_bytes() == b"A" * 4096
    assert (new / "rewritten").stat().st_ino != (old / "rewritten").stat().st_ino
    assert (new / "rewritten").stat().st_mtime_ns == second + 600_000_000
    assert (new / "same").stat().st_ino == (old / "same").stat().st_ino


def test_private_key_never_shown_in_log_backend_or_events(
    tmp_path: Path, redis_url: str, storage: Path, worker: support.Proc
) -> None:
    """The one-time private key appears in no task event, no Redis key or value
    left after the job, and not in the worker's log; the events carry the
    redacted kwargsrepr instead."""
    from celery import Celery

    app = Celery(broker=redis_url)
    events: list[dict] = []
    ready = threading.Event()

    def capture() -> None:
        with app.connection() as conn:
            recv = app.events.Receiver(conn, handlers={"*": events.append})
            ready.set()
            # the capture ends by its timeout (an exception) or at teardown
            with contextlib.suppress(Exception):
                recv.capture(limit=None, timeout=60, wakeup=True)

    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    ready.wait(10)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    done = support.run_backup(redis_url, "host-c", src, pre=["--debug"])
    assert done.returncode == 0, done.stderr
    support.wait_for(lambda: any(e["type"] == "task-succeeded" for e in events), 20,
                     "task-succeeded event")

    sent = [e for e in events if e["type"] in ("task-sent", "task-received")]
    assert sent, events
    for e in sent:
        assert "<redacted>" in e["kwargs"]
    blob = json.dumps(events, default=str)
    r = redis.Redis.from_url(redis_url)
    for key in r.keys("*"):
        kind = r.type(key).decode()
        value = {"string": lambda k: r.get(k), "list": lambda k: r.lrange(k, 0, -1),
                 "hash": lambda k: r.hgetall(k), "set": lambda k: r.smembers(k),
                 "zset": lambda k: r.zrange(k, 0, -1)}[kind](key)
        blob += repr(key) + repr(value)
    blob += worker.text() + done.stderr + done.stdout
    for marker in support.KEY_MARKERS:
        assert marker not in blob


def test_failure_is_reported_with_nonzero_exit(
    tmp_path: Path, redis_url: str, storage: Path, worker: support.Proc
) -> None:
    """A client key other than the one registered for the name fails the backup
    at once with a clear message and exit code (issue 11: the same message as
    for an unregistered name), and leaves the existing snapshot untouched."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    assert support.run_backup(redis_url, "host-d", src).returncode == 0
    first = support.snapshots(storage, "host-d")
    shutil.rmtree(tmp_path / "state")  # the client's sshd host key changes
    done = support.run_backup(redis_url, "host-d", src)
    assert done.returncode == 4, done.stderr
    assert "not signed by the client registered for this name" in done.stderr
    assert "bakgrab trust host-d --key" in done.stderr
    assert support.snapshots(storage, "host-d") == first


def test_invalid_name_is_refused_before_anything_is_sent(
    tmp_path: Path, redis_url: str
) -> None:
    """A bad backup name fails on the client with a clear error (no job sent)."""
    src = tmp_path / "src"
    src.mkdir()
    done = support.run_backup(redis_url, "../etc", src)
    assert done.returncode == 4
    assert "name:" in done.stderr


def test_broker_unreachable_fails_clearly(tmp_path: Path) -> None:
    """No broker at the URL: exit 10 (ClientSetupError) with one line naming
    the broker and the reason, no traceback, and the one-shot sshd's temp dir
    removed (issue 13: not just any error text)."""
    src = tmp_path / "src"
    src.mkdir()
    tmp = tmp_path / "client-tmp"
    tmp.mkdir()
    port = support.free_port()
    url = f"redis://127.0.0.1:{port}/0"
    done = support.run_backup(url, "host-e", src, "--timeout", "20", timeout=90,
                              env={**os.environ, "TMPDIR": str(tmp)})
    assert done.returncode == 10, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"bakgrab: error: cannot reach the broker {url}: "), line
    assert "Connection refused" in line
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert list(tmp.iterdir()) == []


def test_trust_re_pins_after_a_legitimate_key_change(
    tmp_path: Path, redis_url: str, storage: Path, worker: support.Proc
) -> None:
    """After a refused key change, the operator re-keys the name with
    `bakgrab trust NAME --key KEY` (KEY from `bakgrab key` on the client); the
    next backup succeeds; snapshots are untouched."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    assert support.run_backup(redis_url, "host-t", src).returncode == 0
    first = support.snapshots(storage, "host-t")
    shutil.rmtree(tmp_path / "state")
    assert support.run_backup(redis_url, "host-t", src).returncode == 4
    key = support.client_key()
    assert "registered" in support.register(storage, "host-t", key)
    again = support.run_backup(redis_url, "host-t", src)
    assert again.returncode == 0, again.stderr
    snaps = support.snapshots(storage, "host-t")
    assert snaps[0] == first[0] and len(snaps) == 2
    pinned = (storage / ".bakgrab" / "pins" / "host-t.pub").read_text().split()
    assert " ".join(pinned[:2]) == key  # the client made a new key, now registered


def test_the_next_client_removes_what_a_killed_one_left(
    tmp_path: Path, redis_url: str, storage: Path, worker: support.Proc
) -> None:
    """A client killed by SIGKILL while its job is queued leaves its one-shot
    sshd's `bakgrab-sshd-*` dir in TMPDIR; the next client run removes it,
    and only it (issue 13): not the dir of a client still running (which
    holds its owner.lock), not another user's, not one without a lock, not
    a symlink of that name nor what it points to. The running client's dir
    is gone once it ends."""
    from tests.integration.test_client_teardown import stopped_worker

    need_root()  # the other user's dir is made by chown
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    tmp = tmp_path / "client-tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    clients: list[subprocess.Popen[bytes]] = []

    def start_client(name: str) -> tuple[subprocess.Popen[bytes], Path]:
        """A client whose job stays queued (the worker is stopped); its dir."""
        before = set(tmp.glob("bakgrab-sshd-*"))
        err = tmp_path / f"{name}.err"
        with open(err, "wb") as out:
            proc = subprocess.Popen([support.BAKGRAB, "--debug", "backup", "--broker", redis_url,
                                     "--name", name, "--source", str(src), "--timeout", "60"],
                                    stdout=subprocess.DEVNULL, stderr=out,
                                    start_new_session=True, env=env)
        clients.append(proc)
        support.wait_for(lambda: "sent bakgrab.grab" in err.read_text(errors="replace")
                         or proc.poll() is not None, 30, f"{name}'s job sent")
        assert proc.poll() is None, err.read_text()
        [made] = set(tmp.glob("bakgrab-sshd-*")) - before
        return proc, made

    nobody = pwd.getpwnam("nobody").pw_uid
    others = {}
    for kind in ("other-user", "no-lock", "link-target"):
        path = tmp / f"bakgrab-sshd-{kind}"
        path.mkdir(mode=0o700)
        if kind != "no-lock":
            (path / "owner.lock").write_text("")
        (path / "keep").write_text(kind)
        others[kind] = path
    os.chown(others["other-user"], nobody, nobody)
    os.chown(others["other-user"] / "owner.lock", nobody, nobody)
    target = tmp_path / "elsewhere"
    shutil.move(others.pop("link-target"), target)
    link = tmp / "bakgrab-sshd-link"
    link.symlink_to(target)

    try:
        with stopped_worker(worker):
            killed, killed_dir = start_client("killed")
            live, live_dir = start_client("live")
            os.killpg(killed.pid, 9)
            killed.wait(10)
            assert (killed_dir / "sshd_config").is_file()  # what SIGKILL leaves
            live_inode = live_dir.stat().st_ino

            # the next client run (its broker unreachable: it ends at once)
            nxt = support.run_backup(f"redis://127.0.0.1:{support.free_port()}/0", "next",
                                     src, env=env, timeout=60)
            assert nxt.returncode == 10, nxt.stderr
            assert not killed_dir.exists() and not os.path.lexists(killed_dir)
            assert live.poll() is None
            assert live_dir.stat().st_ino == live_inode
            assert (live_dir / "owner.lock").is_file() and (live_dir / "sshd_config").is_file()
            for kind, path in others.items():
                assert (path / "keep").read_text() == kind
            assert link.is_symlink() and (target / "keep").read_text() == "link-target"

            live.terminate()
            live.wait(30)
        assert sorted(p.name for p in tmp.iterdir()) == [
            "bakgrab-sshd-link", "bakgrab-sshd-no-lock", "bakgrab-sshd-other-user"]
    finally:
        for proc in clients:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait(10)


def test_what_killed_processes_leave_in_tmp_is_the_runs_own(
    session_tmpdir: Path, tmp_path: Path, redis_url: str, storage: Path
) -> None:
    """The processes the tests start use the run's own TMPDIR (tests/conftest.py,
    removed when the run ends), not /tmp (issue 13): a worker killed by
    SIGKILL leaves its pool's pymp-* dir there, and so does a killed client
    its bakgrab-sshd-* dir. (Whether /tmp got any is not checked: other runs
    on the machine may write there meanwhile.)"""
    assert session_tmpdir.parent == Path("/tmp") and os.environ["TMPDIR"] == str(session_tmpdir)
    mine = set(os.listdir(session_tmpdir))
    worker = support.start_worker(storage, redis_url, tmp_path / "worker.log")
    try:
        environ = Path(f"/proc/{worker.pid}/environ").read_bytes().split(b"\0")
        assert f"TMPDIR={session_tmpdir}".encode() in environ
        src = tmp_path / "src"
        src.mkdir()
        with open(tmp_path / "client.err", "wb") as err:
            client = subprocess.Popen([support.BAKGRAB, "backup", "--broker", redis_url, "--name",
                                       "killed", "--source", str(src)], stdout=subprocess.DEVNULL,
                                      stderr=err, start_new_session=True)
        try:
            support.wait_for(lambda: list(session_tmpdir.glob("bakgrab-sshd-*/owner.lock")),
                             30, "the client's sshd dir")
            support.wait_for(lambda: list(session_tmpdir.glob("pymp-*")), 30, "the pool's dir")
            client_environ = Path(f"/proc/{client.pid}/environ").read_bytes().split(b"\0")
            assert f"TMPDIR={session_tmpdir}".encode() in client_environ
            os.killpg(client.pid, 9)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(client.pid, 9)
            client.wait(10)
        os.killpg(worker.pid, 9)
        worker.popen.wait(10)
    finally:
        worker.stop()
    left = set(os.listdir(session_tmpdir)) - mine
    assert {n.split("-")[0] for n in left if n.startswith(("pymp-", "bakgrab-sshd-"))} == {
        "pymp", "bakgrab"}, left
