"""Real servers and real trees for integration tests.

Every process a test starts is tracked by pid and stopped by pid (its process
group), never by name. Servers listen on free loopback ports only.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BAKGRAB = str(BIN / "bakgrab")
KEY_MARKERS = ("BEGIN OPENSSH PRIVATE KEY", "b3BlbnNzaC1rZXktdjE")
"""Text found in every OpenSSH private key (the base64 of 'openssh-key-v1')."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class Proc:
    """A started process in its own group, stopped by pid."""

    def __init__(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None,
                 **kw: object) -> None:
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115
        self.popen = subprocess.Popen(
            list(argv), stdout=self._out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, **kw,  # type: ignore[call-overload]
        )
        self.pid = self.popen.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 15) -> None:
        stop_group(self.popen, timeout)
        self._out.close()


def stop_group(popen: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM the process group led by ``popen``, SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, sig)
        try:
            popen.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, signal.SIGKILL)


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def which(program: str) -> str:
    from bakgrab.tasks.process import which as find

    return find(program)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_redis(tmp: Path, extra: Sequence[str] = ()) -> tuple[Proc, str]:
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    proc = Proc(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(tmp), *extra], tmp / "redis.log")
    url = f"redis://127.0.0.1:{port}/0"

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                data = s.recv(64)
                return data.startswith(b"+PONG") or b"NOAUTH" in data
        except OSError:
            return False

    wait_for(up, 10, "redis-server")
    return proc, url


def worker_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAKGRAB_")}
    # Fast retries for tests; production defaults are in tasks/config.py.
    env.update({"BAKGRAB_RETRY_BACKOFF": "0.5", "BAKGRAB_RETRY_BACKOFF_MAX": "2",
                "BAKGRAB_MIN_FREE_ABS": "1M", "BAKGRAB_MIN_FREE_INODES": "100"})
    # Names are registered on their first successful grab here, so that tests
    # about other things need no registration step; tests/integration/
    # test_names.py runs the production default, enrol = "registered" (issue 11).
    env["BAKGRAB_ENROL"] = "first-use"
    # Tests back up many names with one client key (its state dir per test).
    env["BAKGRAB_MAX_NAMES_PER_CLIENT"] = "1000"
    env.update({f"BAKGRAB_{k.upper()}": v for k, v in settings.items()})
    return env


def as_user(user: str, argv: list[str], caps: Sequence[str] = ()) -> list[str]:
    """``argv`` run as ``user`` holding only ``caps``, ambient (like the systemd units)."""
    grant = []
    if caps:
        plus = ",".join(f"+{c}" for c in caps)
        grant = [f"--inh-caps={plus}", f"--ambient-caps={plus}"]
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *grant, *argv]


def start_worker(storage: Path, broker: str, log: Path, *args: str,
                 env: dict[str, str] | None = None, user: str | None = None,
                 caps: Sequence[str] = ()) -> Proc:
    storage.mkdir(parents=True, exist_ok=True)
    argv = [BAKGRAB, "worker", "--storage", str(storage), "--broker", broker, *args]
    if user:
        argv = as_user(user, argv, caps)
    proc = Proc(argv, log, env=env or worker_env())
    try:
        wait_for(lambda: " ready." in proc.text() or not proc.alive(), 60, "worker ready")
    except TimeoutError:
        proc.stop()  # never leave a worker behind when its start is given up
        raise
    if not proc.alive():
        proc.stop()
        raise RuntimeError(f"worker died:\n{proc.text()[-3000:]}")
    return proc


def run_backup(broker: str, name: str, source: Path, *args: str, timeout: float = 120,
               env: dict[str, str] | None = None, user: str | None = None,
               pre: Sequence[str] = (), caps: Sequence[str] = ()
               ) -> subprocess.CompletedProcess[str]:
    argv = [BAKGRAB, *pre, "backup", "--broker", broker, "--name", name, "--source", str(source),
            *args]
    if user:
        argv = as_user(user, argv, caps)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=env or dict(os.environ))


def client_key(env: dict[str, str] | None = None, user: str | None = None) -> str:
    """The client's public key as ``bakgrab key`` prints it (made on first use)
    in the state dir that ``env`` (the test's client environment) points at."""
    argv = [BAKGRAB, "key"]
    done = subprocess.run(as_user(user, argv) if user else argv, capture_output=True,
                          text=True, timeout=60, env=env or dict(os.environ))
    if done.returncode != 0:
        raise RuntimeError(f"bakgrab key failed: {done.stderr}")
    return done.stdout.strip()


def register(storage: Path, name: str, key: str, *args: str) -> str:
    """``bakgrab trust NAME --key KEY [ARGS]`` on the storage, as an operator
    registers a client; its output."""
    done = subprocess.run([BAKGRAB, "trust", "--storage", str(storage), name, "--key", key,
                           *args], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if not k.startswith("BAKGRAB_")}
                          | {"BAKGRAB_CONFIG": os.devnull})
    if done.returncode != 0:
        raise RuntimeError(f"bakgrab trust failed: {done.stderr}")
    return done.stdout


def rsync_diff(src: Path, dst: Path, *extra: str) -> list[str]:
    """What ``rsync -naHAX --numeric-ids -i --checksum`` would still change."""
    out = subprocess.run(
        ["rsync", "-naHAX", "--numeric-ids", "-i", "--checksum", *extra, f"{src}/", f"{dst}/"],
        capture_output=True, check=True,
    ).stdout.decode(errors="replace")
    return [line for line in out.splitlines() if line.strip()]


def tree_state(root: Path, skip: Sequence[str] = ()) -> dict[str, tuple[object, ...]]:
    """What a write anywhere under ``root`` would change, path by path (root
    itself as "."): type and mode, owner, size, mtime, inode, link count, and
    a file's SHA-256 or a symlink's target; ``skip`` names paths (relative to
    ``root``) left out with everything below them. Only atimes are left out
    (reads change them). For "nothing written" checks (issue 13): equal
    names are not enough, a rewrite or chmod in place keeps them."""
    import hashlib
    import stat

    state: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if os.path.relpath(os.path.join(dirpath, d), root) not in skip)
        for entry in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            rel = os.path.relpath(entry, root)
            if rel in skip or (entry != dirpath and not os.path.lexists(entry)):
                continue
            st = os.lstat(entry)
            what: object = None
            if stat.S_ISREG(st.st_mode):
                with open(entry, "rb") as f:
                    what = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(entry)
            state[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                          st.st_ino, st.st_nlink, what)
    return state


def snapshots(storage: Path, name: str) -> list[Path]:
    from bakgrab.worker.storage import parse_snapshot

    found = [p for p in storage.iterdir()
             if (s := parse_snapshot(p.name)) is not None and s.name == name]
    return sorted(found, key=lambda p: int(p.name.rsplit(".", 1)[1]))


def build_fidelity_tree(root: Path) -> dict[str, Path]:
    """A tree with every kind of file and metadata a backup must keep (as root)."""
    root.mkdir(parents=True)
    p: dict[str, Path] = {}
    secret_dir = root / "secret"
    secret_dir.mkdir(mode=0o700)
    (secret_dir / "shadow").write_bytes(b"root-only\n")
    os.chmod(secret_dir / "shadow", 0o600)
    os.chown(secret_dir, 0, 0)
    p["secret"] = secret_dir / "shadow"
    (root / "data").mkdir()
    (root / "data" / "file.txt").write_text("hello\n" * 100)
    os.link(root / "data" / "file.txt", root / "data" / "hardlink.txt")
    os.symlink("file.txt", root / "data" / "symlink")
    os.symlink("/nonexistent/target", root / "data" / "dangling")
    os.mkfifo(root / "data" / "fifo")
    os.mknod(root / "data" / "null-dev", 0o600 | 0o020000, os.makedev(1, 3))
    (root / "data" / "acl.txt").write_text("acl\n")
    subprocess.run(["setfacl", "-m", "u:nobody:r", str(root / "data" / "acl.txt")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "g:nogroup:rx", str(root / "data")], check=True)
    (root / "data" / "xattr.txt").write_text("x\n")
    os.setxattr(root / "data" / "xattr.txt", "user.bakgrab.test", b"value\x00\xff")
    (root / "data" / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "data" / "setuid", 0o4755)
    nobody = pwd.getpwnam("nobody")
    (root / "data" / "owned-by-nobody").write_text("n\n")
    os.chown(root / "data" / "owned-by-nobody", nobody.pw_uid, nobody.pw_gid)
    (root / "name with spaces").write_text("s\n")
    (root / "new\nline").write_text("n\n")
    (root / os.fsdecode(b"bad-\xff\xfe-utf8")).write_text("b\n")
    (root / "empty-dir").mkdir()
    sparse = root / "sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"middle")
    (root / "cache").mkdir()
    (root / "cache" / "big.tmp").write_bytes(b"excluded" * 1000)
    (root / "data" / "skip.log").write_text("excluded\n")
    p["excluded"] = root / "cache"
    os.utime(root / "data" / "file.txt", (1_000_000_000, 1_000_000_000))
    return p


@contextlib.contextmanager
def throwaway_user(name: str, home: Path) -> Iterator[pwd.struct_passwd]:
    """A login user (not locked, /bin/sh) created and removed by the test."""
    subprocess.run(["useradd", "-M", "-d", str(home), "-s", "/bin/sh", name], check=True)
    try:
        # sshd refuses a locked account ('!' in shadow) when PAM is off.
        subprocess.run(["usermod", "-p", "*", name], check=True)
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False)


def readable_tmp(base: Path) -> Path:
    """A dir that other users can traverse (pytest's tmp_path is 0700 root)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="bakgrab-test-"))
    os.chmod(path, 0o755)
    return path


@contextlib.contextmanager
def loop_mount(fstype: str, size: int, options: str = "") -> Iterator[Path]:
    """A fresh ``fstype`` file system in a sparse loop image, mounted with
    ``options``; unmounted and removed afterwards, also when setting it up
    fails half way. Its dir is 0755, so a worker's user can reach it."""
    base = Path(tempfile.mkdtemp(prefix=f"bakgrab-{fstype}-"))
    os.chmod(base, 0o755)
    image, mnt = base / "img", base / "mnt"
    mounted = False
    try:
        with open(image, "wb") as f:
            f.truncate(size)
        mkfs = {"ext4": ["mkfs.ext4", "-q", "-F"], "btrfs": ["mkfs.btrfs", "-q"]}[fstype]
        subprocess.run([*mkfs, str(image)], check=True, capture_output=True, timeout=60)
        mnt.mkdir()
        subprocess.run(["mount", "-o", ",".join(["loop", *filter(None, [options])]), str(image),
                        str(mnt)], check=True, timeout=60)
        mounted = True
        yield mnt
    finally:
        if mounted:
            done = subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60)
            if done.returncode != 0:  # a process of a failed test may still hold it
                subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def unreadable_tree(base: Path, user: pwd.struct_passwd) -> tuple[Path, dict[str, str]]:
    """A tree that ``user`` (a client running without capabilities) can back
    up only in part: ``ok`` it owns, ``root-only`` (0600 root) it cannot read,
    so rsync exits 23 and the snapshot is partial. The tree and the client
    environment (its own state dir) to run ``run_backup`` with as ``user``."""
    src = base / "src"
    src.mkdir()
    (src / "ok").write_text("fine\n")
    (src / "root-only").write_text("secret\n")
    os.chmod(src / "root-only", 0o600)
    os.chown(src, user.pw_uid, user.pw_gid)
    os.chown(src / "ok", user.pw_uid, user.pw_gid)
    state = base / "state"
    state.mkdir()
    os.chown(state, user.pw_uid, user.pw_gid)
    return src, {"PATH": os.environ["PATH"], "HOME": str(base), "XDG_STATE_HOME": str(state)}
