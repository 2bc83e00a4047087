"""The four tools the benchmark runs, each behind the same small interface.

* ``bakgrab``: ``bakgrab backup`` end to end against a running worker and
  Redis (the client starts its one-shot sshd; the worker pulls with rsync).
* ``rsync``: bare rsync with bakgrab's own argv (``bakgrab.worker.rsync.pull_argv``)
  over ssh to a plain sshd, ``--link-dest`` the newest snapshot: the floor.
* ``rsync_btrfs`` (issue 14): bare rsync on btrfs the way bakgrab's btrfs
  backend pulls: ``btrfs subvolume snapshot`` of the newest backup, rsync
  with the same argv plus the backend's options into it (``--inplace
  --no-whole-file``, no ``--link-dest``), then the read-only flag;
* ``bakgrab_btrfs``: ``bakgrab`` with its storage on btrfs;
* ``rsnapshot``: the Debian package, over ssh to the same sshd, link_dest on,
  the same rsync flags.
* ``borg``: a local repository, no encryption, lz4.

A tool gives, for a backup name and a source: the argv of one backup, the
argv that removes its oldest snapshot, where its storage is (for ``du``) and
which long-lived server processes do part of its work (for CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.bench import procs

SNAPSHOT_RE = re.compile(r"^(?P<name>[^.].*)\.(?P<date>\d{4}-\d{2}-\d{2})\.(?P<ts>\d+)$")


@dataclasses.dataclass
class Job:
    """One program run a measurement waits for."""

    argv: list[str]
    env: dict[str, str] | None = None
    stdout: Path | None = None
    ok_codes: tuple[int, ...] = (0,)
    after: Callable[[Job], dict[str, Any]] | None = None
    started: float = 0.0
    ended: float = 0.0


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BAKGRAB_", "BORG_"))}
    env["LC_ALL"] = "C"
    env.update(extra)
    return env


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)
    return path.with_suffix(".pub").read_text().strip()


class SshServer:
    """A plain sshd of our own on a free loopback port, with its own host
    key and one authorized client key (for bare rsync and rsnapshot); or on
    ``listen`` inside a client namespace (``wrap``: scenario 8's slow link)."""

    ALIAS = "bench-sshd"

    def __init__(self, work: Path, listen: str = "127.0.0.1",
                 wrap: Callable[[Sequence[str]], list[str]] | None = None,
                 name: str = "sshd") -> None:
        self.address = listen
        self.dir = work / name
        self.dir.mkdir(mode=0o700)
        host_pub = keygen(self.dir / "host_key")
        client_pub = keygen(self.dir / "client_key")
        self.key = self.dir / "client_key"
        (self.dir / "authorized_keys").write_text(client_pub + "\n")
        self.known_hosts = self.dir / "known_hosts"
        self.known_hosts.write_text(f"{self.ALIAS} {host_pub}\n")
        import pwd

        self.user = pwd.getpwuid(os.getuid()).pw_name
        cfg = self.dir / "sshd_config"
        cfg.write_text("\n".join([
            f"ListenAddress {listen}",
            f"HostKey {self.dir / 'host_key'}",
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
            f"AllowUsers {self.user}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "UseDNS no",
            "StrictModes no",
            "PrintMotd no",
            "PrintLastLog no",
            "Compression no",
            "PidFile none",
            "MaxStartups 100:30:200",
            "MaxSessions 100",
            "LogLevel ERROR",
            "",
        ]))
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        sshd = procs.find("sshd") or "/usr/sbin/sshd"
        subprocess.run([sshd, "-t", "-f", str(cfg)], check=True)
        inside = wrap or list
        self.proc, self.port = procs.start_server(
            lambda port: inside([sshd, "-D", "-e", "-f", str(cfg), "-p", str(port)]),
            self.dir / "sshd.log", "sshd")

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until every connection's sshd has ended (and been reaped), so
        that their CPU is in the listener's counters."""
        with contextlib.suppress(TimeoutError):
            procs.wait_for(lambda: not procs.children(self.proc.pid), timeout, "sshd sessions",
                           interval=0.01)

    def stop(self) -> None:
        self.proc.stop()


def rsync_argv(ssh: SshServer, source: Path, dest: Path, link_dest: Path | None,
               exclude_file: Path, compress: str | None = None,
               ciphers: str = "", btrfs: bool = False) -> tuple[list[str], str]:
    """bakgrab's own pull argv, aimed at ``source`` on our sshd; and where the
    flags came from. ``compress`` (issue 19): a value of bakgrab's compress
    setting as the worker passes it to pull_argv; None keeps PullSpec's
    default, plain ``-z`` (the original design's flags). ``btrfs`` (issue
    14): with the options of the worker's btrfs backend
    (``bakgrab.worker.backend.Subvolumes.pull_options``), as its grabs run."""
    try:
        from bakgrab.worker import backend, rsync

        spec = rsync.PullSpec(
            user=ssh.user, address=ssh.address, port=ssh.port, key_file=ssh.key,
            known_hosts=ssh.known_hosts, host_alias=ssh.ALIAS, exclude_file=exclude_file,
            dest=dest, link_dest=link_dest, timeout=300, connect_timeout=20, alive_interval=15,
            **({"compress": compress} if compress is not None else {}),
            **({"ciphers": ciphers} if ciphers else {}),
            **({"backend_options": backend.Subvolumes.pull_options} if btrfs else {}),
        )
        argv = rsync.pull_argv(spec)
        origin = "bakgrab.worker.rsync.pull_argv"
    except Exception as e:  # the product changed under us: same flags, spelled here
        origin = f"copy of bakgrab's flags (bakgrab.worker.rsync.pull_argv failed: {e})"
        argv = ["rsync", "-HaAXz", "--sparse", "--numeric-ids", "--super",
                "--delete", "--delete-excluded", f"--exclude-from={exclude_file}",
                "--timeout=300", "--stats", "--info=progress2", "--no-human-readable",
                "--outbuf=L", "--rsh=" + " ".join(ssh_argv(ssh))]
        if link_dest:
            argv.append(f"--link-dest={link_dest}")
        if btrfs:
            argv += ["--inplace", "--no-whole-file"]
        argv += ["x", "x"]
    return argv[:-2] + [f"{ssh.user}@{ssh.address}:{source}/", f"{dest}/"], origin


def ssh_argv(ssh: SshServer) -> list[str]:
    try:
        from bakgrab.worker import rsync

        spec = rsync.PullSpec(
            user=ssh.user, address="127.0.0.1", port=ssh.port, key_file=ssh.key,
            known_hosts=ssh.known_hosts, host_alias=ssh.ALIAS, exclude_file=Path("/dev/null"),
            dest=Path("/"), link_dest=None, timeout=300, connect_timeout=20, alive_interval=15,
        )
        return rsync.ssh_command(spec)
    except Exception:
        return ["ssh", "-F", "/dev/null", "-p", str(ssh.port), "-i", str(ssh.key),
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={ssh.known_hosts}",
                "-o", f"HostKeyAlias={ssh.ALIAS}", "-o", "StrictHostKeyChecking=yes",
                "-o", "Compression=no", "-o", "LogLevel=ERROR"]


class LoopStorage:
    """A storage filesystem of its own: a sparse image holding a fresh ext4
    (or btrfs: ``kind``), loop-mounted on the tool's storage dir, remade
    empty on demand.

    A fresh filesystem per first backup keeps runs independent: on a disk
    where many files were just deleted, ext4 spends seconds of CPU per 20,000
    new files skipping recently deleted inodes (``recently_deleted()`` in
    ``ext4_create``), so a first backup right after a wipe measures that
    instead of the tool.
    """

    def __init__(self, image: Path, mountpoint: Path, size: int, kind: str = "ext4") -> None:
        self.image = image
        self.mountpoint = mountpoint
        self.size = size
        self.kind = kind
        self.mounted = False
        self.fresh()

    def fresh(self, keep: Sequence[str] = ()) -> None:
        """Replace the filesystem by an empty one, carrying over the entries
        ``keep`` (paths relative to its root) with their metadata."""
        saved = self.image.with_name(self.image.name + ".keep")
        if self.mounted and keep:
            shutil.rmtree(saved, ignore_errors=True)
            saved.mkdir()
            for rel in keep:
                if (self.mountpoint / rel).exists():
                    subprocess.run(["cp", "-a", "--parents", rel, str(saved)],
                                   cwd=self.mountpoint, check=True)
        self.unmount()
        with contextlib.suppress(FileNotFoundError):
            self.image.unlink()
        with open(self.image, "wb") as f:
            f.truncate(self.size)
        if self.kind == "btrfs":
            mkfs = ["mkfs.btrfs", "-q", "-f"]
            # (as the storage of tests/integration/test_btrfs.py: a worker
            # without CAP_SYS_ADMIN may delete its own subvolumes)
            options = "loop,user_subvol_rm_allowed"
        else:
            mkfs = ["mkfs.ext4", "-q", "-F", "-m", "0", "-E",
                    "lazy_itable_init=1,lazy_journal_init=1"]
            options = "loop,noinit_itable"
        subprocess.run([*mkfs, str(self.image)], check=True, capture_output=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-o", options, str(self.image), str(self.mountpoint)],
                       check=True, capture_output=True)
        self.mounted = True
        os.chmod(self.mountpoint, 0o755)  # noqa: S103 -- a storage root like any other
        if saved.is_dir():
            for entry in os.listdir(saved):
                subprocess.run(["cp", "-a", entry, str(self.mountpoint)], cwd=saved, check=True)
            shutil.rmtree(saved)

    def unmount(self) -> None:
        if not self.mounted:
            return
        for _ in range(20):
            if subprocess.run(["umount", str(self.mountpoint)], capture_output=True).returncode == 0:
                break
            time.sleep(0.25)
        else:
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        self.mounted = False

    def close(self) -> None:
        self.unmount()
        with contextlib.suppress(FileNotFoundError):
            self.image.unlink()

    @staticmethod
    def available(work: Path, kind: str = "ext4") -> str | None:
        """Why loop-mounted storage of ``kind`` cannot be used here, or None."""
        if os.geteuid() != 0:
            return "not root"
        for prog in (f"mkfs.{kind}", "mount", "umount", "losetup"):
            if procs.find(prog) is None:
                return f"{prog} not found"
        probe = work / f"probe-{kind}.img"
        mnt = work / f"probe-{kind}"
        fs = LoopStorage.__new__(LoopStorage)
        fs.image, fs.mountpoint, fs.mounted, fs.kind = probe, mnt, False, kind
        fs.size = 64 << 20 if kind == "ext4" else 128 << 20  # (btrfs's least: 109 MiB)
        try:
            fs.fresh()
        except (OSError, subprocess.CalledProcessError) as e:
            err = getattr(e, "stderr", b"") or b""
            return (f"cannot loop-mount a {kind} image: "
                    f"{err.decode(errors='replace').strip() or e}")
        finally:
            fs.close()
            with contextlib.suppress(OSError):
                mnt.rmdir()
        return None

    def stop(self) -> None:
        self.close()


class Tool:
    key = ""
    label = ""
    kept_state: tuple[str, ...] = ()
    """Entries of the storage that survive its replacement by an empty
    filesystem (the tool's own keys and pins, not backups)."""
    storage: Path
    usage: tuple[int, int] | None = None
    """``du`` of the storage after the last measurement; None once anything
    else (a wipe, a repository init) may have changed it."""

    def server_pids(self) -> list[int]:
        return []

    def settle(self) -> None:
        pass

    def disk_usage(self) -> tuple[int, int]:
        """(bytes, inodes) the storage holds (see :func:`storage_usage`)."""
        return storage_usage(self.storage)

    def newest_tree(self, name: str) -> Path | None:
        """Where the newest backup of ``name`` holds the source's tree, for a
        check of its content; None for a tool without such a tree (borg)."""
        return None

    def prepare(self, name: str) -> bool:
        """Whatever a name needs before its first backup (not measured);
        whether that changed the storage."""
        return False

    def backup(self, name: str, source: Path) -> Job:
        raise NotImplementedError

    def snapshots(self, name: str) -> list[str]:
        """The name's snapshots, oldest first."""
        raise NotImplementedError

    def remove_oldest(self, name: str) -> list[Job]:
        raise NotImplementedError

    def wipe(self, name: str) -> None:
        raise NotImplementedError

    def forget(self) -> None:
        """The storage was replaced by an empty filesystem: drop what the tool
        keeps elsewhere about it (caches, lists)."""

    def stop(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {}


def storage_usage(path: Path) -> tuple[int, int]:
    """(bytes, inodes) of a storage. On ext4 and the like ``du`` of it, each
    inode once (:func:`procs.disk_usage`). On btrfs ``du`` counts every
    snapshot's shared blocks again: the bytes there are the filesystem's
    used bytes (``statvfs``, after a commit and btrfs's cleaner, as the
    worker measures), the inodes ``du --inodes`` over every subvolume (each
    snapshot's own inodes, which copy-on-write shares on disk)."""
    from bakgrab.worker import btrfs

    if not btrfs.on_btrfs(path):
        return procs.disk_usage(path)
    btrfs.settle(path)
    st = os.statvfs(path)
    done = subprocess.run(["du", "-s", "--inodes", str(path)], capture_output=True, text=True,
                          check=True)
    return (st.f_blocks - st.f_bfree) * st.f_frsize, int(done.stdout.split()[0])


def auto_choice(address: str = "127.0.0.1") -> tuple[str, str] | None:
    """What bakgrab's ``compress = auto`` chooses for a first grab from
    ``address`` (issue 19), by the worker's own function: the compression and
    ssh's cipher preference; None for a bakgrab without the setting."""
    try:
        from bakgrab.worker import compress
    except ImportError:
        return None
    choice = compress.decide("auto", address, None)
    return choice.used, getattr(choice, "ciphers", "")


class Bakgrab(Tool):
    """``bakgrab backup`` against our own redis-server and ``bakgrab worker``."""

    key = "bakgrab"
    label = "bakgrab"
    # The worker's state dir: its request key (which clients pin), host-key
    # pins, locks. Snapshots and their in-progress dirs are outside or emptied.
    kept_state = (".bakgrab",)

    def __init__(self, work: Path, bakgrab: str, concurrency: int,
                 link_address: str | None = None, key: str = "", label: str = "") -> None:
        self.key = key or self.key
        self.label = label or self.label
        self.bin = bakgrab
        self.dir = work / self.key
        self.dir.mkdir()
        self.storage = work / "storage" / self.key
        self.storage.mkdir(parents=True, exist_ok=True)
        (self.dir / "redis").mkdir()
        (self.dir / "state").mkdir()
        (self.dir / "results").mkdir()
        config = self.dir / "empty.toml"
        config.write_text("")
        # scenario 8's client reaches the broker over the slow link (a namespace
        # of the benchmark's own: nothing else can reach that address)
        bind = (["--bind", "127.0.0.1", link_address, "--protected-mode", "no"]
                if link_address else ["--bind", "127.0.0.1"])
        self.redis, port = procs.start_server(
            lambda p: ["redis-server", "--port", str(p), *bind, "--save", "",
                       "--appendonly", "no", "--dir", str(self.dir / "redis")],
            self.dir / "redis.log", "redis-server")
        self.broker = f"redis://127.0.0.1:{port}/0"
        self.link_broker = f"redis://{link_address}:{port}/0" if link_address else ""
        try:
            self._start_worker(bakgrab, concurrency, config)
        except BaseException:
            self.redis.stop()
            raise
        self.concurrency = concurrency
        self.counter = 0
        self.registered: set[str] = set()
        self.prune = self._has_prune()

    def _start_worker(self, bakgrab: str, concurrency: int, config: Path) -> None:
        # Cleanup must never remove anything on a shared disk during the run.
        self.worker_env = clean_env(BAKGRAB_CONFIG=str(config), BAKGRAB_MIN_FREE_ABS="1M",
                                    BAKGRAB_MIN_FREE_INODES="100")
        self.client_env = clean_env(BAKGRAB_CONFIG=str(config),
                                    XDG_STATE_HOME=str(self.dir / "state"))
        self.worker_log = self.dir / "worker.log"
        self.worker = procs.Proc(
            [bakgrab, "worker", "--storage", str(self.storage), "--broker", self.broker,
             "--concurrency", str(concurrency), "--loglevel", "INFO"],
            self.worker_log, env=self.worker_env)
        try:
            procs.wait_for(lambda: " ready." in self.worker.text() or not self.worker.alive(),
                           120, "bakgrab worker ready")
        except TimeoutError:
            self.worker.stop()
            raise
        if not self.worker.alive():
            text = self.worker.text()[-3000:]
            self.worker.stop()
            raise RuntimeError(f"bakgrab worker died:\n{text}")

    def _has_prune(self) -> bool:
        p = subprocess.run([self.bin, "prune", "--help"], capture_output=True, text=True,
                           env=self.client_env)
        return p.returncode == 0 and "--min-keep" in p.stdout

    def server_pids(self) -> list[int]:
        return [self.worker.pid, self.redis.pid]

    def env_of(self, name: str) -> dict[str, str]:
        """The client environment of the host backed up as ``name``: a state
        dir (its identity key, request-key pins) of its own, as every real
        client host has, so the benchmark's clients are distinct clients
        (max_jobs_per_client counts per client key)."""
        return {**self.client_env, "XDG_STATE_HOME": str(self.dir / "state" / name)}

    def register(self, name: str) -> None:
        """Register ``name`` to its client's key, as an operator does once
        (``bakgrab trust NAME --key``); not part of any measured job."""
        if name in self.registered:
            return
        done = subprocess.run([self.bin, "key"], capture_output=True, text=True,
                              env=self.env_of(name), check=True)
        subprocess.run([self.bin, "trust", "--storage", str(self.storage), name, "--key",
                        done.stdout.strip()], capture_output=True, text=True,
                       env=self.worker_env, check=True)
        self.registered.add(name)

    def backup(self, name: str, source: Path) -> Job:
        self.register(name)
        self.counter += 1
        out = self.dir / "results" / f"{self.counter}.json"

        def after(job: Job) -> dict[str, Any]:
            try:
                result = json.loads(out.read_text())
            except (OSError, ValueError):
                return {}
            return {"worker_duration": result.get("duration"),
                    "bytes_transferred": result.get("bytes_transferred"),
                    "snapshot": result.get("snapshot")}

        return Job([self.bin, "backup", "--broker", self.broker, "--name", name, "--source",
                    str(source), "--json"], env=self.env_of(name), stdout=out, after=after)

    def backup_over(self, wrap: Callable[[Sequence[str]], list[str]], name: str,
                    source: Path) -> Job:
        """The client's ``bakgrab backup`` on the far side of scenario 8's link."""
        job = self.backup(name, source)
        argv = list(job.argv)
        argv[argv.index(self.broker)] = self.link_broker
        job.argv = wrap(argv)
        return job

    def snapshots(self, name: str) -> list[str]:
        found = []
        for entry in os.listdir(self.storage):
            m = SNAPSHOT_RE.match(entry)
            if m and m.group("name") == name:
                found.append((int(m.group("ts")), entry))
        return [e for _, e in sorted(found)]

    def newest_tree(self, name: str) -> Path | None:
        snaps = self.snapshots(name)
        return self.storage / snaps[-1] if snaps else None

    def remove_oldest(self, name: str) -> list[Job]:
        snaps = self.snapshots(name)
        others = [len(self.snapshots(n)) for n in self.names() if n != name]
        if self.prune and len(snaps) >= 2 and all(c < len(snaps) for c in others):
            # The real cleanup (`bakgrab prune`, the rule run before every
            # grab): ask for more free space than there is and let it go down
            # to min_keep = all but one of this name's snapshots.
            return [Job([self.bin, "prune", "--storage", str(self.storage),
                         "--min-free-abs", "1000000G", "--min-keep", str(len(snaps) - 1),
                         "--json"], env=self.worker_env, ok_codes=(0, 6))]
        code = ("import sys\n"
                "from bakgrab.worker.retention import remove_snapshot\n"
                "from bakgrab.worker.storage import Storage, parse_snapshot\n"
                "remove_snapshot(Storage(sys.argv[1]), parse_snapshot(sys.argv[2]))\n")
        return [Job([self.python(), "-c", code, str(self.storage), snaps[0]],
                    env=self.worker_env)]

    def python(self) -> str:
        with open(self.bin) as f:
            first = f.readline()
        return first[2:].strip() if first.startswith("#!") else "python3"

    def names(self) -> set[str]:
        return {m.group("name") for e in os.listdir(self.storage)
                if (m := SNAPSHOT_RE.match(e))}

    def wipe(self, name: str) -> None:
        for snap in self.snapshots(name):
            shutil.rmtree(self.storage / snap)
            for suffix in (".json", ".exclude"):
                with contextlib.suppress(FileNotFoundError):
                    (self.storage / ".bakgrab" / "meta" / (snap + suffix)).unlink()

    def worker_log_offset(self) -> int:
        try:
            return self.worker_log.stat().st_size
        except OSError:
            return 0

    def task_times(self, offset: int) -> list[dict[str, float]]:
        """Worker log lines since ``offset``: when each task was received (epoch
        s) and how long Celery says it ran."""
        with open(self.worker_log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        received: dict[str, float] = {}
        out = []
        for line in text.splitlines():
            m = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/[^\]]*\] "
                         r"Task bakgrab\.grab\[([^\]]+)\] (received|succeeded in ([\d.]+)s)", line)
            if not m:
                continue
            when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if m.group(3) == "received":
                received[m.group(2)] = when
            elif m.group(2) in received:
                out.append({"received": received[m.group(2)], "runtime": float(m.group(4)),
                            "logged_done": when})
        return out

    def stop(self) -> None:
        self.worker.stop(timeout=30)
        self.redis.stop()

    def compress_used(self) -> dict[str, dict[str, int]]:
        """Per name, how many of its snapshots still recorded used each
        compression, as their metadata says (what ``auto`` chose, issue 19)."""
        seen: dict[str, dict[str, int]] = {}
        for meta in (self.storage / ".bakgrab" / "meta").glob("*.json"):
            try:
                data = json.loads(meta.read_text())
                name, used = data["name"], data["compress"]["used"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(name, str) and isinstance(used, str):
                seen.setdefault(name, {})[used] = seen.get(name, {}).get(used, 0) + 1
        return seen

    def describe(self) -> dict[str, Any]:
        return {"worker_concurrency": self.concurrency,
                "scenario7_method": "bakgrab prune (make_room)" if self.prune
                else "bakgrab.worker.retention.remove_snapshot",
                "compress_used": self.compress_used()}


class BareRsync(Tool):
    """rsync with bakgrab's flags over ssh, --link-dest the newest snapshot.

    ``compress`` None: pull_argv's default spec, plain ``-z`` (the original
    design's flags, the table's "bare rsync" of earlier runs); else the value
    bakgrab's ``compress = auto`` chose for this link (issue 19), so that
    "bakgrab / bare rsync (auto's choice)" measures bakgrab's own overhead
    with the very flags its worker ran."""

    key = "rsync"
    label = "bare rsync"

    def __init__(self, work: Path, ssh: SshServer, compress: str | None = None,
                 key: str = "", label: str = "", ciphers: str = "") -> None:
        if compress is not None:
            self.key = "rsync_auto"
            self.label = f"bare rsync, auto's choice ({compress})"
        self.key = key or self.key
        self.label = label or self.label
        self.compress = compress
        self.ciphers = ciphers
        self.ssh = ssh
        self.storage = work / "storage" / self.key
        self.storage.mkdir(parents=True, exist_ok=True)
        self.exclude = work / f"{self.key}-exclude"
        self.exclude.write_text("")
        self.counter = 0
        self.origin = ""
        self.out = work / f"{self.key}-out"
        self.out.mkdir()

    def server_pids(self) -> list[int]:
        return [self.ssh.proc.pid]

    def settle(self) -> None:
        self.ssh.settle()

    def snapshots(self, name: str) -> list[str]:
        found = []
        for entry in os.listdir(self.storage):
            stem, _, k = entry.rpartition(".")
            if stem == name and k.isdigit():
                found.append((int(k), entry))
        return [e for _, e in sorted(found)]

    def backup(self, name: str, source: Path) -> Job:
        self.counter += 1
        snaps = self.snapshots(name)
        link = self.storage / snaps[-1] if snaps else None
        dest = self.storage / f"{name}.{self.counter}"
        argv, self.origin = rsync_argv(self.ssh, source, dest, link, self.exclude, self.compress,
                                       self.ciphers)
        return Job(argv, env=clean_env(), stdout=self.out / f"{self.counter}.txt")

    def newest_tree(self, name: str) -> Path | None:
        snaps = self.snapshots(name)
        return self.storage / snaps[-1] if snaps else None

    def remove_oldest(self, name: str) -> list[Job]:
        return [Job(["rm", "-rf", "--one-file-system", "--",
                     str(self.storage / self.snapshots(name)[0])])]

    def wipe(self, name: str) -> None:
        for snap in self.snapshots(name):
            shutil.rmtree(self.storage / snap)

    def describe(self) -> dict[str, Any]:
        return {"flags_from": self.origin, "compress": self.compress or "any (plain -z)",
                "ssh_ciphers": self.ciphers or "ssh's own"}


class SnapshotRsync(BareRsync):
    """Bare rsync with the snapshot method of bakgrab's btrfs backend (issue
    14), on a btrfs storage: ``btrfs subvolume snapshot`` of the name's
    newest backup (``btrfs subvolume create`` for a first one), rsync with
    bakgrab's argv and the backend's options into it, then ``btrfs property
    set ro true``; one shell job, so that the measure covers all three. No
    unsharing of hard-linked files before the in-place pull, which bakgrab
    does (correct as long as the client splits no hard-linked pair: the
    generated tree's changes split none)."""

    key = "rsync_btrfs"
    label = "bare rsync, btrfs snapshot method"
    options: list[str] = []
    """rsync's options in the last backup (all but --rsh, the excludes, the paths)."""
    SCRIPT = ('set -e; prev=$1; dest=$2; shift 2\n'
              'if [ -n "$prev" ]; then btrfs subvolume snapshot "$prev" "$dest" >/dev/null\n'
              'else btrfs subvolume create "$dest" >/dev/null; fi\n'
              '"$@"\n'
              'btrfs property set -ts "$dest" ro true\n')

    def __init__(self, work: Path, ssh: SshServer, compress: str | None = None,
                 ciphers: str = "") -> None:
        super().__init__(work, ssh, compress=compress, ciphers=ciphers, key=self.key,
                         label=self.label + (f" ({compress})" if compress else ""))

    def backup(self, name: str, source: Path) -> Job:
        self.counter += 1
        snaps = self.snapshots(name)
        prev = str(self.storage / snaps[-1]) if snaps else ""
        dest = self.storage / f"{name}.{self.counter}"
        argv, self.origin = rsync_argv(self.ssh, source, dest, None, self.exclude, self.compress,
                                       self.ciphers, btrfs=True)
        self.options = [a for a in argv[1:-2] if not a.startswith(("--rsh=", "--exclude-from="))]
        return Job(["sh", "-c", self.SCRIPT, "sh", prev, str(dest), *argv], env=clean_env(),
                   stdout=self.out / f"{self.counter}.txt")

    def remove_oldest(self, name: str) -> list[Job]:
        return [Job(["btrfs", "subvolume", "delete", str(self.storage / self.snapshots(name)[0])])]

    def wipe(self, name: str) -> None:
        for snap in self.snapshots(name):
            subprocess.run(["btrfs", "subvolume", "delete", str(self.storage / snap)],
                           check=True, capture_output=True)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "method": "btrfs subvolume snapshot of the newest, "
                "rsync --inplace --no-whole-file into it, btrfs property set ro true",
                "rsync_options": self.options}


class Rsnapshot(Tool):
    """rsnapshot (link_dest 1) pulling the source over ssh from our sshd."""

    key = "rsnapshot"
    label = "rsnapshot"
    INTERVAL = "alpha"

    def __init__(self, work: Path, ssh: SshServer) -> None:
        self.ssh = ssh
        self.dir = work / "rsnapshot"
        self.dir.mkdir()
        self.storage = work / "storage" / "rsnapshot"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.bin = procs.find("rsnapshot") or "rsnapshot"
        self.sources: dict[str, Path] = {}

    def server_pids(self) -> list[int]:
        return [self.ssh.proc.pid]

    def settle(self) -> None:
        self.ssh.settle()

    def config(self, name: str, source: Path) -> Path:
        cfg = self.dir / f"{name}.conf"
        if self.sources.get(name) == source and cfg.exists():
            return cfg
        self.sources[name] = source
        # The same rsync flags as bakgrab's pull, less what rsnapshot sets itself
        # (--rsh, --link-dest) and plus the --relative its layout needs.
        argv, _ = rsync_argv(self.ssh, source, Path("/x"), None, Path("/dev/null"))
        # (--out-format too: rsnapshot splits its long args at spaces, and the
        # itemized list is for bakgrab's manifest, not the transfer)
        long_args = ["--relative"] + [a for a in argv[2:-2] if a.startswith("--")
                                      and not a.startswith(("--rsh=", "--exclude-from=",
                                                            "--out-format="))]
        # -z stands apart from -HaAX since issue 19: rsnapshot takes it in its short args
        short = argv[1] + "".join(a[1:] for a in argv[2:-2] if a == "-z")
        ssh = ssh_argv(self.ssh)
        lines = [
            ("config_version", "1.2"),
            ("snapshot_root", f"{self.storage / name}/"),
            ("no_create_root", "0"),
            ("cmd_rsync", procs.find("rsync") or "/usr/bin/rsync"),
            ("cmd_ssh", procs.find(ssh[0]) or "/usr/bin/ssh"),
            ("cmd_rm", shutil.which("rm") or "/bin/rm"),
            ("retain", f"{self.INTERVAL}\t100000"),
            ("verbose", "1"),
            ("loglevel", "1"),
            ("lockfile", str(self.dir / f"{name}.pid")),
            ("link_dest", "1"),
            ("rsync_short_args", short),
            ("rsync_long_args", " ".join(long_args)),
            ("ssh_args", " ".join(ssh[1:])),
            ("backup", f"{self.ssh.user}@127.0.0.1:{source}/\thost/"),
        ]
        cfg.write_text("".join(f"{k}\t{v}\n" for k, v in lines))
        check = subprocess.run([self.bin, "-c", str(cfg), "configtest"], capture_output=True,
                               text=True)
        if check.returncode != 0:
            raise RuntimeError(f"rsnapshot configtest failed for {cfg}:\n"
                               f"{check.stdout}{check.stderr}")
        return cfg

    def backup(self, name: str, source: Path) -> Job:
        cfg = self.config(name, source)
        return Job([self.bin, "-c", str(cfg), self.INTERVAL], env=clean_env())

    def snapshots(self, name: str) -> list[str]:
        root = self.storage / name
        if not root.is_dir():
            return []
        found = []
        for entry in os.listdir(root):
            stem, _, k = entry.rpartition(".")
            if stem == self.INTERVAL and k.isdigit():
                found.append((int(k), entry))
        # alpha.0 is the newest
        return [e for _, e in sorted(found, reverse=True)]

    def newest_tree(self, name: str) -> Path | None:
        snaps = self.snapshots(name)
        # (--relative: the source's whole path below host/)
        return (self.storage / name / snaps[-1] / "host" / str(self.sources[name]).lstrip("/")
                if snaps else None)

    def remove_oldest(self, name: str) -> list[Job]:
        # What rsnapshot's rotation does to the oldest snapshot (cmd_rm).
        return [Job(["rm", "-rf", "--", str(self.storage / name / self.snapshots(name)[0])])]

    def wipe(self, name: str) -> None:
        shutil.rmtree(self.storage / name, ignore_errors=True)


class Borg(Tool):
    """borg create into a local repository: no encryption, lz4."""

    key = "borg"
    label = "borg (local, lz4)"

    def __init__(self, work: Path) -> None:
        self.dir = work / "borg"
        self.dir.mkdir()
        self.storage = work / "storage" / "borg"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.bin = procs.find("borg") or "borg"
        self.archives: dict[str, list[str]] = {}
        self.counter = 0

    def env(self, name: str) -> dict[str, str]:
        return clean_env(BORG_BASE_DIR=str(self.dir / name),
                         BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                         BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
                         BORG_CHECK_I_KNOW_WHAT_I_AM_DOING="NO",
                         BORG_DELETE_I_KNOW_WHAT_I_AM_DOING="YES")

    def repo(self, name: str) -> Path:
        return self.storage / name

    def prepare(self, name: str) -> bool:
        if name in self.archives and self.repo(name).is_dir():
            return False
        subprocess.run([self.bin, "init", "--encryption=none", str(self.repo(name))],
                       env=self.env(name), check=True, capture_output=True)
        self.archives[name] = []
        return True

    def backup(self, name: str, source: Path) -> Job:
        if self.prepare(name):
            self.usage = None
        self.counter += 1
        archive = f"{name}-{self.counter}"
        self.archives[name].append(archive)
        # cd into the source so that every tool's snapshot holds the same paths
        return Job(["sh", "-c", 'cd "$1" && exec "$2" create --compression lz4 "$3" .', "sh",
                    str(source), self.bin, f"{self.repo(name)}::{archive}"], env=self.env(name))

    def snapshots(self, name: str) -> list[str]:
        return list(self.archives.get(name, []))

    def remove_oldest(self, name: str) -> list[Job]:
        archive = self.archives[name].pop(0)
        repo = str(self.repo(name))
        return [Job([self.bin, "delete", f"{repo}::{archive}"], env=self.env(name)),
                Job([self.bin, "compact", repo], env=self.env(name))]

    def wipe(self, name: str) -> None:
        shutil.rmtree(self.repo(name), ignore_errors=True)
        shutil.rmtree(self.dir / name, ignore_errors=True)
        self.archives.pop(name, None)

    def forget(self) -> None:
        for name in list(self.archives):
            self.wipe(name)


def versions(bakgrab: str) -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        text = (p.stdout or p.stderr).strip()
        return text.splitlines()[0] if text else "?"

    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    rsnapshot = procs.find("rsnapshot") or "rsnapshot"
    out = {
        "bakgrab": first_line([bakgrab, "--version"]),
        "rsync": first_line(["rsync", "--version"]),
        "openssh": ssh,
        "redis-server": first_line(["redis-server", "--version"]),
        "rsnapshot": first_line([rsnapshot, "-V"]),
        "borg": first_line(["borg", "--version"]),
    }
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("celery", "kombu"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    import platform

    out["python"] = platform.python_version()
    return out


def shell_join(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def now() -> float:
    return time.time()
