"""The backup-host half of ``bakgrab doctor``: the capabilities rsync needs to
keep all metadata, and a storage directory the worker can use safely.

STORAGE holds what clients sent, as sent: device nodes, setuid and setgid
files, world-writable dirs, owned by any uid (issue 11, attack 11). Only two
things keep them from other local users, and doctor warns when either is
missing: no other user can reach into STORAGE (it or a parent dir is closed
to them: 0700), and its filesystem is mounted ``nodev,nosuid`` (a device node
opened there fails, a setuid file runs without its privilege).
"""

from __future__ import annotations

import contextlib
import grp
import os
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from bakgrab.tasks import caps
from bakgrab.tasks.doctor import Check, capabilities
from bakgrab.tasks.errors import ConfigError
from bakgrab.worker import sandbox


def checks(user: str | None, storage_dir: str | None) -> Iterator[Check]:
    yield from capabilities("worker", caps.WORKER_CAPS, "FAIL")
    yield from rsync_sandbox(Path(storage_dir) if storage_dir else None)
    if storage_dir:
        yield from storage(Path(storage_dir))
        yield from storage_backend(Path(storage_dir))


def rsync_sandbox(storage_dir: Path | None) -> Iterator[Check]:
    """Whether the kernel can confine each rsync to its name's paths (issue 11)."""
    if sandbox.abi() < sandbox.MIN_ABI:
        yield "FAIL", "rsync sandbox", (
            f"{sandbox.describe()}: the worker refuses to start; enable Landlock in the "
            "kernel (lsm= boot parameter), or set sandbox = \"off\" knowingly "
            "(docs/security.md)")
        return
    yield "ok", "rsync sandbox", sandbox.describe()
    if storage_dir is not None:
        try:
            sandbox.check_storage(storage_dir)
        except ConfigError as e:
            yield "FAIL", "storage place", str(e)


def storage(path: Path) -> Iterator[Check]:
    if not path.is_dir():
        yield "FAIL", "storage", f"{path} is not a directory"
        return
    st = path.stat()
    if st.st_uid not in (os.geteuid(), 0):
        yield "warn", "storage owner", f"{path} belongs to uid {st.st_uid}, not to this user"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        yield "FAIL", "storage mode", f"{path} is group/world-writable: chmod go-w {path}"
    else:
        yield "ok", "storage mode", oct(stat.S_IMODE(st.st_mode))
    if not os.access(path, os.W_OK):
        yield "FAIL", "storage access", f"{path} is not writable by this user"
    yield from reach(path)
    yield from mount_options(path)
    state = path / ".bakgrab"
    if state.exists() and stat.S_IMODE(state.stat().st_mode) != 0o700:
        yield "FAIL", "state dir", f"{state} must be 0700: chmod 700 {state}"
    free = shutil.disk_usage(path).free
    yield "ok", "storage free", f"{free / (1 << 30):.1f} GiB"


def reach(path: Path) -> Iterator[Check]:
    """Whether users other than the owner can list or enter STORAGE: they can
    when STORAGE grants them r or x and every parent lets them pass (x)."""
    real = Path(os.path.realpath(path))
    st = real.stat()
    mode = stat.S_IMODE(st.st_mode)
    modes = [(p, p.stat().st_mode) for p in real.parents]
    shut = [p for p, m in modes if not m & (stat.S_IXGRP | stat.S_IXOTH)]
    fix = f"chmod 700 {real}"
    hazard = "snapshots hold clients' device nodes and setuid files as sent"
    if not mode & 0o077:
        yield "ok", "storage access", f"{real} is {oct(mode)}: no other user reaches it"
    elif shut:
        yield "ok", "storage access", f"{real} is {oct(mode)} but {shut[0]} closes it to others"
    elif mode & (stat.S_IROTH | stat.S_IXOTH) and all(m & stat.S_IXOTH for _, m in modes):
        kind = "readable" if mode & stat.S_IROTH else "traversable"
        yield "warn", "storage access", (
            f"{real} is {kind} by every local user ({oct(mode)}); {hazard}: {fix}")
    elif mode & (stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH):
        try:
            group = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            group = str(st.st_gid)
        yield "warn", "storage access", (
            f"{real} is open to group {group} ({oct(mode)}); {hazard}: {fix}")
    else:
        yield "ok", "storage access", f"{real} is {oct(mode)}: others may only write (see mode)"


def mount_of(path: Path, mountinfo: str = "/proc/self/mountinfo") -> tuple[str, set[str]] | None:
    """The mount point holding ``path`` and its per-mount options (the last
    mount listed on the longest matching point wins: it is the one on top)."""
    real = os.path.realpath(path)
    best: tuple[str, set[str]] | None = None
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            # id parent major:minor root MOUNTPOINT OPTIONS ... - fstype source superopts
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and (best is None or len(point) >= len(best[0])):
                best = (point, set(fields[5].split(",")))
    return best


def mount_options(path: Path) -> Iterator[Check]:
    try:
        found = mount_of(path)
    except OSError as e:
        yield "warn", "storage mount", f"cannot read /proc/self/mountinfo: {e}"
        return
    if found is None:
        yield "warn", "storage mount", f"no mount found for {path} in /proc/self/mountinfo"
        return
    point, options = found
    missing = [o for o in ("nodev", "nosuid") if o not in options]
    if missing:
        yield "warn", "storage mount", (
            f"{point} (holding {path}) is mounted without {','.join(missing)}: a client's "
            f"device node or setuid file in a snapshot works as such; mount it with "
            f"nodev,nosuid (fstab options, or `mount -o remount,nodev,nosuid {point}`)")
    else:
        yield "ok", "storage mount", f"{point} is mounted nodev,nosuid"


def super_options(path: Path, mountinfo: str = "/proc/self/mountinfo") -> tuple[str, set[str]]:
    """The filesystem type and superblock options (after ``-`` in mountinfo)
    of the mount holding ``path``: where btrfs keeps user_subvol_rm_allowed."""
    real = os.path.realpath(path)
    best = ("", "", set[str]())
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best[0]) and "-" in fields:
                rest = fields[fields.index("-") + 1:]
                best = (point, rest[0], set(rest[2].split(",")) if len(rest) > 2 else set())
    return best[1], best[2]


def storage_backend(path: Path) -> Iterator[Check]:
    """Which backend the storage gets (issue 14) and, on btrfs, whether this
    user can make, freeze and delete snapshots there: the mount option, then
    a live probe in the state dir (a subvolume made, snapshotted read-only
    and both deleted), which proves the capabilities too."""
    from bakgrab.worker import backend, btrfs

    if not path.is_dir():
        return
    chosen = backend.for_path(path)
    if chosen.name != "btrfs":
        yield "ok", "storage backend", (
            f"hard links (--link-dest): {path} is not on btrfs; a file in more than "
            f"{os.pathconf(path, 'PC_LINK_MAX')} snapshots is stored as a copy")
        return
    yield "ok", "storage backend", "btrfs: each snapshot a read-only subvolume"
    try:
        _, opts = super_options(path)
    except OSError as e:
        yield "warn", "btrfs mount", f"cannot read /proc/self/mountinfo: {e}"
        opts = {"user_subvol_rm_allowed"}
    if "user_subvol_rm_allowed" not in opts and os.geteuid() != 0:
        yield "FAIL", "btrfs mount", (
            f"the filesystem of {path} is mounted without user_subvol_rm_allowed: the worker "
            "(no CAP_SYS_ADMIN) cannot delete snapshots, so cleanup fails; add it to the "
            "fstab options and `mount -o remount,user_subvol_rm_allowed` (deploy/README.md)")
    state = path / ".bakgrab" / "run"
    if state.is_dir() and os.access(state, os.W_OK):
        probe = state / f".doctor-subvolume.{os.getpid()}"
        frozen = state / f".doctor-snapshot.{os.getpid()}"
        try:
            with caps.raised("dac_override", "fowner"):
                btrfs.create(probe)
                btrfs.snapshot(probe, frozen, readonly=True)
                ro = btrfs.readonly(frozen)
                btrfs.delete(frozen)
                btrfs.delete(probe)
            if ro:
                yield "ok", "btrfs snapshots", (
                    "this user made a subvolume and a read-only snapshot, and deleted both")
            else:
                yield "FAIL", "btrfs snapshots", "a snapshot made read-only is writable"
        except OSError as e:
            yield "FAIL", "btrfs snapshots", (
                f"this user cannot manage subvolumes in {state} ({btrfs.errno_name(e)}: "
                f"{e.strerror}): the worker needs CAP_FOWNER and CAP_DAC_OVERRIDE and the "
                "mount option user_subvol_rm_allowed")
        finally:
            for left in (frozen, probe):
                # (an empty subvolume goes by rmdir(2), even without the option)
                with contextlib.suppress(OSError), caps.raised("dac_override", "fowner"):
                    os.rmdir(left)
    if btrfs.quotas_consistent(path):
        yield "ok", "btrfs quotas", "on: `bakgrab list` reads each snapshot's size from them"
    else:
        yield "ok", "btrfs quotas", (
            "off (or a rescan pending): `bakgrab list` measures what each snapshot holds alone "
            "by a walk of its extents (FIEMAP); `btrfs quota enable` makes that instant, at "
            "some cost to writes and deletes")

