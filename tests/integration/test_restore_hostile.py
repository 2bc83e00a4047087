"""Restores a hostile backup host cannot turn against the client (issue 12).

A restore runs on the client as root, with data the backup host chooses. These
tests play the backup host for real: snapshots crafted directly in a real
worker's storage (the client registered with `bakgrab trust --key`), rsync
pushes through the client's real gate and sshd, and a real unprivileged local
user racing a real restore. What they pin:

* privilege (setuid/setgid bits, file capabilities, device nodes, other
  users' ownership) arrives only in a private staging dir, and exactly;
* into an open dir it stays behind, each entry reported, exit 1, and
  ``--privileged`` is refused there (exit 10);
* the gate's receiver, whatever the pushing rsync asks for, applies no
  privilege unless the client asked for a privileged session;
* the staging dir never takes the snapshot root's mode or owner;
* a local user who races the client's metadata changes changes nothing
  outside the staging dir.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests import support
from tests.conftest import need_root
from tests.integration.test_restore import register, restore

pytestmark = [pytest.mark.integration, pytest.mark.root]

OTHER_UID = 54321
CAP_NET_RAW = "cap_net_raw+ep"


def xattr(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def privileged_tree(root: Path) -> None:
    """Every kind of privilege a file can carry, as a backup host may hold it."""
    (root / "bin").mkdir(parents=True)
    for name, mode in (("suid", 0o4755), ("sgid", 0o2755), ("cap", 0o755)):
        (root / "bin" / name).write_bytes(b"#!/bin/sh\necho " + name.encode() + b"\n")
        os.chmod(root / "bin" / name, mode)
    subprocess.run(["setcap", CAP_NET_RAW, str(root / "bin" / "cap")], check=True)
    (root / "dev").mkdir()
    os.mknod(root / "dev" / "mem-like", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (root / "theirs").write_text("someone else's\n")
    os.chown(root / "theirs", OTHER_UID, OTHER_UID)
    (root / "shared").mkdir()
    os.chmod(root / "shared", 0o2775)
    os.mkfifo(root / "fifo")
    os.chown(root / "fifo", OTHER_UID, OTHER_UID)
    os.chmod(root / "fifo", 0o4666)
    (root / "plain").write_text("plain\n")


def assert_unprivileged(into: Path) -> None:
    """What an open staging dir holds after a hostile tree came in."""
    for name in ("suid", "sgid", "cap"):
        st = os.lstat(into / "bin" / name)
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o755, 0), name
        assert (into / "bin" / name).read_bytes().startswith(b"#!/bin/sh")
    assert xattr(into / "bin" / "cap", "security.capability") is None
    assert not (into / "dev" / "mem-like").exists()
    assert os.lstat(into / "theirs").st_uid == 0
    assert (into / "theirs").read_text() == "someone else's\n"
    assert stat.S_IMODE(os.lstat(into / "shared").st_mode) == 0o775
    assert (into / "plain").read_text() == "plain\n"
    for path in into.rglob("*"):
        st = os.lstat(path)
        assert not stat.S_ISCHR(st.st_mode) and not stat.S_ISBLK(st.st_mode), path
        if not stat.S_ISLNK(st.st_mode):
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), path
            assert st.st_uid == 0, path
            assert not [n for n in os.listxattr(path) if not n.startswith("user.")
                        or n.startswith("user.rsync.")], path


# -- a real worker serving crafted snapshots --------------------------------------------


@pytest.fixture
def crafted(tmp_path: Path, storage: Path, worker: support.Proc) -> Path:
    """A snapshot of name "evil" made by the backup host, not by a backup."""
    need_root()
    snap = storage / "evil.2026-01-01.1767225600"
    snap.mkdir(mode=0o755)
    privileged_tree(snap)
    register(tmp_path, storage, "evil")
    return snap


def test_privilege_stays_behind_in_an_open_staging_dir(
    tmp_path: Path, redis_url: str, crafted: Path
) -> None:
    """Into a 0755 dir, setuid/setgid bits, file capabilities, device nodes and
    other owners do not arrive: each is reported, the exit status is 1, and
    what has no privilege comes back as it was."""
    into = tmp_path / "open"
    into.mkdir(mode=0o755)
    done = restore(redis_url, "evil", into, ".")
    assert done.returncode == 1, done.stderr
    out = json.loads(done.stdout)
    assert out["private"] is False and out["partial"] is True
    stripped = {e["path"]: e["dropped"] for e in out["stripped"]}
    assert "setuid bit" in stripped["bin/suid"]
    assert "setgid bit" in stripped["bin/sgid"]
    assert "xattr security.capability" in stripped["bin/cap"]
    assert f"owner uid {OTHER_UID}" in stripped["theirs"]
    assert "setgid bit" in stripped["shared"]
    assert {"setuid bit", f"owner uid {OTHER_UID}"} <= set(stripped["fifo"])
    assert "plain" not in stripped
    assert out["specials_skipped"] == ["dev/mem-like"]
    assert_unprivileged(into)
    assert stat.S_ISFIFO(os.lstat(into / "fifo").st_mode)
    assert stat.S_IMODE(os.lstat(into / "fifo").st_mode) == 0o666
    assert (stat.S_IMODE(os.stat(into).st_mode), os.stat(into).st_uid) == (0o755, 0)
    assert not [p for p in os.listdir(into) if p.startswith(".bakgrab")]


def test_privileged_is_refused_for_an_open_dir(
    tmp_path: Path, redis_url: str, crafted: Path
) -> None:
    """`--privileged` into a dir other users can enter fails before any job is
    sent (exit 10) and writes nothing there."""
    into = tmp_path / "open"
    into.mkdir(mode=0o755)
    done = subprocess.run(
        [support.BAKGRAB, "restore", "--broker", redis_url, "--name", "evil", "--into",
         str(into), "--privileged", "."], capture_output=True, text=True, timeout=120)
    assert done.returncode == 10, done.stderr
    assert "--privileged" in done.stderr and "not 0700" in done.stderr
    assert os.listdir(into) == []
    world = tmp_path / "world"
    world.mkdir()
    os.chmod(world, 0o777)
    done = restore(redis_url, "evil", world, ".")
    assert done.returncode == 10, done.stderr
    assert "other users can write" in done.stderr
    assert os.listdir(world) == []


def test_private_staging_dir_gets_everything_exactly(
    tmp_path: Path, redis_url: str, crafted: Path
) -> None:
    """--into a new path: bakgrab makes it 0700, and the restore brings back
    owners, modes, setuid/setgid bits, file capabilities, FIFOs and device
    nodes exactly (exit 0); the staging dir keeps its own mode and owner even
    though the snapshot root is world-writable and someone else's."""
    os.chmod(crafted, 0o777)
    os.chown(crafted, OTHER_UID, OTHER_UID)
    into = tmp_path / "fresh"
    done = subprocess.run(
        [support.BAKGRAB, "restore", "--broker", redis_url, "--name", "evil", "--into",
         str(into), "--privileged", "--json", "."], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["private"] is True and out["stripped"] == [] and out["specials_skipped"] == []
    assert (stat.S_IMODE(os.stat(into).st_mode), os.stat(into).st_uid) == (0o700, 0)
    # everything but the staging dir itself, which keeps its own attributes
    assert [d for d in support.rsync_diff(crafted, into) if not d.endswith(" ./")] == []
    assert stat.S_IMODE(os.lstat(into / "bin" / "suid").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(into / "shared").st_mode) == 0o2775
    assert xattr(into / "bin" / "cap", "security.capability") == xattr(
        crafted / "bin" / "cap", "security.capability") is not None
    assert os.lstat(into / "dev" / "mem-like").st_rdev == os.makedev(1, 3)
    fifo = os.lstat(into / "fifo")
    assert (stat.S_IMODE(fifo.st_mode), fifo.st_uid) == (0o4666, OTHER_UID)
    assert sorted(os.listdir(into)) == sorted(os.listdir(crafted))  # no wrapper left


def test_files_vanishing_during_the_restore_are_reported(
    tmp_path: Path, redis_url: str, storage: Path, worker: support.Proc
) -> None:
    """Files removed from the snapshot while it is pushed (rsync exit 24) make
    the restore exit 1 with a warning saying so: never a plain success."""
    need_root()
    snap = storage / "gone.2026-01-01.1767225600"
    (snap / "many").mkdir(parents=True)
    for i in range(3000):
        (snap / "many" / f"f{i:04d}").write_bytes(os.urandom(16384))
    register(tmp_path, storage, "gone")
    into = tmp_path / "into"
    errors: list[BaseException] = []
    removed: list[str] = []

    def remove_the_rest() -> None:
        try:
            deadline = time.time() + 60
            while time.time() < deadline:
                arrived = list(into.glob(".bakgrab-restore.*/r/many/*"))
                if arrived:
                    for i in range(2999, 2899, -1):
                        (snap / "many" / f"f{i:04d}").unlink()
                        removed.append(f"f{i:04d}")
                    return
                time.sleep(0.001)
            raise TimeoutError("no file arrived in the staging dir")
        except BaseException as e:  # handed to the test below, never swallowed
            errors.append(e)

    remover = threading.Thread(target=remove_the_rest)
    remover.start()
    try:
        done = restore(redis_url, "gone", into, "many")
    finally:
        remover.join(70)
    assert not remover.is_alive() and errors == [], errors
    assert len(removed) == 100
    assert done.returncode == 1, done.stderr
    out = json.loads(done.stdout)
    assert out["partial"] is True and out["rsync_exit"] == 24
    assert any("vanished" in w for w in out["warnings"])
    assert not (into / "many" / "f2999").exists()
    assert (into / "many" / "f0000").read_bytes() == (snap / "many" / "f0000").read_bytes()


# -- the gate against a real hostile push -----------------------------------------------


def push(tmp_path: Path, src: Path, staging: Path, mode: str,
         *extra: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """A hostile backup host's push of ``src`` into the gate serving ``staging``:
    rsync as root, asking the receiver for every privilege it can name."""
    from bakgrab.client import keys
    from bakgrab.client.sshd import OneShotServer, ServerConfig, parse_allow

    key = keys.one_time_key()
    key_file = tmp_path / f"key-{mode}"
    key_file.write_text(key.private)
    key_file.chmod(0o600)
    host_key, _ = keys.host_key(tmp_path / "state")
    with OneShotServer(ServerConfig(source=staging, public_key=key.public,
                                    allow=parse_allow("127.0.0.1"), host_key=host_key,
                                    listen="127.0.0.1", mode=mode)) as srv:
        ssh = (f"ssh -F /dev/null -p {srv.port} -i {key_file} -o BatchMode=yes "
               "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null")
        done = subprocess.run(
            ["rsync", "-HaAXz", "--numeric-ids", "--super", "-M--super", "--relative",
             *extra, "-e", ssh, f"{src}/./", "root@127.0.0.1:/"],
            capture_output=True, text=True, timeout=60)
        log = srv.gate_log.read_text()
    return done, log


@pytest.fixture
def wrapper(tmp_path: Path) -> Path:
    """The client's layout: a 0700 wrapper, the receiver's dir inside it."""
    need_root()
    wrap = tmp_path / "wrap"
    wrap.mkdir(mode=0o700)
    (wrap / "r").mkdir(mode=0o700)
    return wrap / "r"


def test_open_gate_applies_no_privilege_whatever_the_pusher_asks(
    tmp_path: Path, wrapper: Path
) -> None:
    """Through a "wo" gate (a staging dir that is not private), a push with
    --super, -M--super and -M--no-super writes no setuid/setgid bit, no file
    capability, no device node, no foreign owner: the gate made the receiver
    --fake-super, whose records the client reads and removes."""
    src = tmp_path / "src"
    src.mkdir()
    privileged_tree(src)
    done, log = push(tmp_path, src, wrapper, "wo", "-M--no-super", "-M--super")
    assert done.returncode in (0, 23), done.stderr  # 23: no device nodes (--drop-D)
    assert "refused" not in log
    for name in ("suid", "sgid", "cap"):
        st = os.lstat(wrapper / "bin" / name)
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), name
        assert st.st_uid == 0
    assert xattr(wrapper / "bin" / "cap", "security.capability") is None
    assert not (wrapper / "dev" / "mem-like").exists()
    assert os.lstat(wrapper / "theirs").st_uid == 0
    assert not os.lstat(wrapper / "shared").st_mode & stat.S_ISGID
    # what would have been applied is only recorded, in user.rsync.* xattrs
    assert xattr(wrapper / "bin" / "suid", "user.rsync.%stat") is not None


def test_privileged_gate_needs_a_private_parent(tmp_path: Path, wrapper: Path) -> None:
    """A "wp" gate lets privilege through into the client's private wrapper
    (the control: this push does carry it), and refuses, writing nothing,
    when the staging dir's parent is open to other users."""
    src = tmp_path / "src"
    src.mkdir()
    privileged_tree(src)
    done, log = push(tmp_path, src, wrapper, "wp")
    assert done.returncode in (0, 23), done.stderr  # 23: no device nodes (--drop-D)
    assert stat.S_IMODE(os.lstat(wrapper / "bin" / "suid").st_mode) == 0o4755
    assert xattr(wrapper / "bin" / "cap", "security.capability") is not None
    assert os.lstat(wrapper / "theirs").st_uid == OTHER_UID

    exposed = tmp_path / "exposed"
    exposed.mkdir(mode=0o755)
    os.chmod(exposed, 0o755)
    (exposed / "r").mkdir(mode=0o700)
    for mode in ("wp", "wo"):
        done, log = push(tmp_path, src, exposed / "r", mode)
        assert done.returncode != 0
        assert "parent is not private" in log
        assert os.listdir(exposed / "r") == []


# -- a local user racing the client ----------------------------------------------------

RACER = r"""
import os, stat, sys, time
base, victim, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
end = time.time() + seconds
swaps = writable = 0
while time.time() < end:
    for dirpath, dirs, files in os.walk(base):
        if not os.access(dirpath, os.W_OK):
            continue
        writable += 1
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                if not stat.S_ISFIFO(os.lstat(path).st_mode):
                    continue
                tmp = os.path.join(dirpath, ".swap%d" % os.getpid())
                try:
                    os.symlink(victim, tmp)
                except FileExistsError:
                    pass
                os.rename(tmp, path)
                swaps += 1
            except OSError:
                pass
    count = os.path.join(os.environ["HOME"], "count")
    with open(count + ".new", "w") as f:
        f.write("%d %d\n" % (writable, swaps))
    os.replace(count + ".new", count)
"""


def test_a_local_user_racing_the_restore_changes_nothing_outside(
    tmp_path: Path, redis_url: str, storage: Path, worker: support.Proc, shared_tmp: Path
) -> None:
    """Finding 1 of issue 12: a backup host pushes a dir owned by a local user
    with a thousand setuid FIFOs; that user swaps every FIFO it can for a
    symlink to a root-owned file while root restores, round after round (into
    open staging dirs, with and without a dir of the user's own there first).
    No file outside the staging dirs changes mode or owner."""
    need_root()
    name = f"bkrace{os.getpid() % 100000}"
    home = shared_tmp / "home"
    with support.throwaway_user(name, home) as pw:
        home.mkdir()
        os.chown(home, pw.pw_uid, pw.pw_gid)
        victim = shared_tmp / "victim"
        victim.write_text("root's\n")
        os.chmod(victim, 0o644)
        watched = [victim, shared_tmp, home]
        before = {p: (os.lstat(p).st_mode, os.lstat(p).st_uid, os.lstat(p).st_gid)
                  for p in watched}
        snap = storage / "race.2026-01-01.1767225600"
        (snap / "u").mkdir(parents=True)
        os.chown(snap / "u", pw.pw_uid, pw.pw_gid)
        for i in range(1000):
            fifo = snap / "u" / f"f{i:04d}"
            os.mkfifo(fifo)
            os.chown(fifo, pw.pw_uid, pw.pw_gid)
            os.chmod(fifo, 0o4777)
        register(tmp_path, storage, "race")
        arena = shared_tmp / "arena"
        arena.mkdir(mode=0o755)
        seconds = 15.0  # the old code lost the race within 2.5 s (issue 12)
        racer = support.Proc(
            support.as_user(name, ["/usr/bin/python3", "-I", "-c", RACER, str(arena),
                                   str(victim), str(seconds + 60)]),
            tmp_path / "racer.log", env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
            cwd=str(shared_tmp))
        try:
            deadline = time.time() + seconds
            rounds = 0
            while time.time() < deadline:
                into = arena / f"into{rounds}"
                into.mkdir(mode=0o755)
                if rounds % 2:
                    (into / "u").mkdir(mode=0o755)  # the user's own dir, already there
                    os.chown(into / "u", pw.pw_uid, pw.pw_gid)
                done = restore(redis_url, "race", into, "u")
                assert done.returncode == 1, done.stderr
                out = json.loads(done.stdout)
                if rounds % 2:
                    assert [e["path"] for e in out["refused"]] == ["u"]
                    assert all(n.startswith(".swap") for n in os.listdir(into / "u"))
                else:
                    assert os.lstat(into / "u").st_uid == 0
                    assert len([n for n in os.listdir(into / "u")
                                if stat.S_ISFIFO(os.lstat(into / "u" / n).st_mode)]) == 1000
                for path, was in before.items():
                    st = os.lstat(path)
                    assert (st.st_mode, st.st_uid, st.st_gid) == was, path
                rounds += 1
            assert racer.alive(), racer.text()  # it raced the whole time
            assert rounds >= 2
        finally:
            racer.stop()
            shutil.rmtree(shared_tmp / "arena", ignore_errors=True)
        writable, _swaps = (int(x) for x in (home / "count").read_text().split())
        assert writable > 0  # it had dirs to work in: its own u
        for path, was in before.items():
            st = os.lstat(path)
            assert (st.st_mode, st.st_uid, st.st_gid) == was, path
        assert (victim.read_text(), stat.S_IMODE(victim.stat().st_mode)) == ("root's\n", 0o644)
