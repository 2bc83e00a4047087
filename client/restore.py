"""``bakgrab restore``: get files back the same safe way a backup is made.

Like a backup in reverse: the client serves a staging directory through a
one-shot sshd whose gate lets through only a write-only rsync receiver
(``rrsync -wo -no-del``), and the worker pushes the selected paths of a
snapshot into it. The worker only pushes to the host whose sshd key is pinned
for the name. A compromised backup host can at worst put wrong files into the
staging directory (``--into DIR``); it never gains anything on the client
(issue 12). Invariants:

* rsync never writes into DIR itself but into ``DIR/.bakgrab-restore.XXXX/r``:
  the wrapper ``.bakgrab-restore.XXXX`` is made here, 0700 and owned by the
  restoring user, before the job is sent, and is out of rsync's reach, so no
  other user can enter anything rsync writes, whatever modes, owners or ACLs
  the pushed tree carries, for the whole restore. The snapshot root's own
  attributes (what restoring ``.`` brings) land on ``r`` and are thrown away:
  DIR's mode and owner are never taken from the snapshot, and are checked
  again at the end.
* Privilege (setuid/setgid bits, file capabilities, device nodes, files owned
  by other users) comes back only into a *private* DIR: 0700, owned by the
  restoring user, on a path no other user can change. Into any other DIR
  those entries come back without it (bits stripped, no devices, no
  capabilities or other non-``user.*`` xattrs, no ACLs, owned by the restoring
  user), each reported, and the restore ends with exit 1. The gate enforces
  the same for what rsync writes (``--fake-super`` on the receiver: see
  :mod:`bakgrab.client.gate`), and this module checks it again before
  anything leaves the wrapper. ``--privileged`` asks for privilege and is
  refused for a DIR that is not private.
* Every metadata change made here goes through the fd of the entry just
  opened or made (``O_PATH|O_NOFOLLOW`` and ``/proc/self/fd/N``, or the fd of
  a directory opened ``O_NOFOLLOW|O_DIRECTORY`` one component at a time),
  never through a path another process could swap.
* Entries leave the wrapper by ``rename`` into DIR (atomic, whole subtrees at
  once). A name that already exists in DIR is merged (directories) or
  replaced (files), and refused, reported, when its directory in DIR could be
  written by another user.
* A restore where anything was skipped, refused, stripped, or where files
  vanished or could not be read on the backup host, reports it and exits 1.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any

from bakgrab.client.backup import BackupOptions, Reporter, Session, submit
from bakgrab.tasks import RESTORE
from bakgrab.tasks.config import Settings
from bakgrab.tasks.errors import BakgrabError, ClientSetupError
from bakgrab.tasks.nofollow import DIR_FLAGS, descend
from bakgrab.tasks.request import RestoreRequest, check_name, check_paths

log = logging.getLogger(__name__)

WRAPPER_PREFIX = ".bakgrab-restore."
RECEIVED = "r"
"""The rrsync dir inside the wrapper: the only place rsync can write."""
FAKE_SUPER = "user.rsync."
"""Where rsync ``--fake-super`` keeps what it would not apply (owners, modes,
ACLs, non-user xattrs); read for the report, then removed."""
SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID
PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_REPORTED = 1000


class PrivilegeRefused(ClientSetupError):
    """``--privileged`` for a staging dir that is not private (exit 10)."""


@dataclasses.dataclass
class Report:
    """What the restore could not bring back exactly, path by path."""

    stripped: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    refused: list[dict[str, str]] = dataclasses.field(default_factory=list)
    dropped_count: int = 0

    refused_count: int = 0

    def strip(self, path: str, what: list[str]) -> None:
        self.dropped_count += 1
        if len(self.stripped) < MAX_REPORTED:
            self.stripped.append({"path": path[:4096], "dropped": what})
            log.warning("restored without its privilege: %r: %s", path, ", ".join(what))

    def refuse(self, path: str, why: str) -> None:
        self.refused_count += 1
        if len(self.refused) < MAX_REPORTED:
            self.refused.append({"path": path[:4096], "why": why})
            log.warning("not restored: %r: %s", path, why)


def others_can_write(st: os.stat_result) -> bool:
    """Whether a user other than us (or root) could change entries in this dir."""
    return st.st_uid not in (0, os.geteuid()) or bool(st.st_mode & 0o022)


def why_not_private(fd: int) -> str | None:
    """Why the dir held by ``fd`` is not a private staging dir, or None: a
    private dir is 0700 and ours, and every directory above it is root's or
    ours and not writable by others (a sticky one like /tmp only when the next
    step is root's or ours), so no other user can enter it or put another dir
    in its place."""
    real = os.readlink(proc_path(fd))
    walk = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # search right only
    cur = os.open("/", walk)
    try:
        parts = [p for p in real.split("/") if p]
        for i, part in enumerate(parts):
            parent = os.fstat(cur)
            try:
                child = os.open(part, walk, dir_fd=cur)
            except OSError as e:
                return f"cannot walk to it without following symlinks: {e.strerror}"
            os.close(cur)
            cur = child
            st = os.fstat(cur)
            where = "/" + "/".join(parts[:i])
            if parent.st_uid not in (0, os.geteuid()):
                return f"{where} belongs to uid {parent.st_uid}"
            if parent.st_mode & 0o022 and not (parent.st_mode & stat.S_ISVTX
                                               and st.st_uid in (0, os.geteuid())):
                return f"other users can write {where}"
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (os.fstat(cur).st_dev, os.fstat(cur).st_ino):
            return "it was moved while being checked"
        if st.st_uid != os.geteuid():
            return f"it is owned by uid {st.st_uid}, not by this user"
        if stat.S_IMODE(st.st_mode) & 0o077:
            return f"it is mode {stat.S_IMODE(st.st_mode):04o}, not 0700"
        return None
    finally:
        os.close(cur)


@dataclasses.dataclass
class Staging:
    """DIR, held by fd, and the private wrapper rsync writes into."""

    path: Path
    fd: int
    before: os.stat_result
    private: bool
    wrapper: str
    wrapper_fd: int
    received_fd: int

    @property
    def received_path(self) -> Path:
        return Path(os.readlink(proc_path(self.fd))) / self.wrapper / RECEIVED

    def close(self) -> None:
        for fd in (self.received_fd, self.wrapper_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        try:
            shutil.rmtree(self.wrapper, dir_fd=self.fd)
        except OSError as e:
            log.warning("could not remove %s/%s: %s", self.path, self.wrapper, e)
        os.close(self.fd)


def open_staging(into: Path, privileged: bool) -> Staging:
    """DIR opened (made 0700 when missing) and a fresh private wrapper in it."""
    try:
        os.mkdir(into, 0o700)
        made = True
    except FileExistsError:
        made = False
    except OSError as e:
        raise ClientSetupError(f"--into {into}: cannot create it: {e.strerror}") from None
    try:
        fd = os.open(into, DIR_FLAGS)
    except OSError as e:
        raise ClientSetupError(f"--into {into}: not a directory we can open without "
                               f"following a symlink: {e.strerror}") from None
    try:
        if made:
            os.fchmod(fd, 0o700)  # the umask can only take bits away; be exact
        before = os.fstat(fd)
        if others_can_write(before):
            raise ClientSetupError(
                f"--into {into}: other users can write this directory, so they could "
                "swap what is restored into it; restore into a directory of its own "
                "(bakgrab creates it 0700 when it does not exist)")
        why = why_not_private(fd)
        if privileged and why:
            raise PrivilegeRefused(
                f"--privileged: --into {into}: {why}; privileged entries are restored only into a "
                "private dir (0700, yours, on a path no other user can change): give "
                "--into a new path and bakgrab creates it so")
        wrapper = WRAPPER_PREFIX + secrets.token_hex(8)
        os.mkdir(wrapper, 0o700, dir_fd=fd)
        wfd = os.open(wrapper, DIR_FLAGS, dir_fd=fd)
        os.fchmod(wfd, 0o700)
        os.mkdir(RECEIVED, 0o700, dir_fd=wfd)
        rfd = os.open(RECEIVED, DIR_FLAGS, dir_fd=wfd)
    except BaseException:
        os.close(fd)
        raise
    staging = Staging(path=into, fd=fd, before=before, private=why is None,
                      wrapper=wrapper, wrapper_fd=wfd, received_fd=rfd)
    if not staging.private:
        log.warning("--into %s is not private (%s): setuid/setgid bits, file capabilities, "
                    "device nodes and other users' ownership come back without their "
                    "privilege", into, why)
    return staging


def restore(opts: BackupOptions, settings: Settings, snapshot: str, paths: list[str],
            progress: Reporter | None = None, privileged: bool = False) -> dict[str, Any]:
    """Restore ``paths`` of ``snapshot`` of ``opts.name`` into ``opts.source``."""
    name = check_name(opts.name)
    wanted = check_paths(paths)

    def fields(s: Session) -> dict[str, Any]:
        return RestoreRequest(name=name, snapshot=snapshot, paths=wanted, address=s.address,
                              port=s.port, user=s.user, key=s.key,
                              host_key=s.host_key).to_wire()

    staging = open_staging(opts.source, privileged)
    try:
        # "wp" lets rsync apply privilege; "wo" makes the gate force --fake-super
        mode = "wp" if staging.private else "wo"
        served = dataclasses.replace(opts, source=staging.received_path)
        result = submit(served, settings, RESTORE, mode, fields, progress)
        report = Report()
        if not staging.private:
            unprivilege(staging.received_fd, report)
        made, skipped = recreate_specials(staging.received_fd, result.pop("specials", []),
                                          staging.private, report)
        merge(staging.received_fd, staging.fd, "", staging.private, report)
        check_root(staging, report)
    finally:
        staging.close()
    result["private"] = staging.private
    result["specials_created"] = made
    result["specials_skipped"] = skipped
    result["stripped"] = report.stripped
    result["stripped_count"] = report.dropped_count
    result["refused"] = report.refused
    if skipped or report.dropped_count or report.refused_count or result.get("failed_paths"):
        result["partial"] = True
    return result


# -- helpers on fds ---------------------------------------------------------------------


def proc_path(fd: int) -> str:
    """The magic link naming exactly the inode ``fd`` holds (Linux)."""
    return f"/proc/self/fd/{fd}"


def set_xattrs(fd: int, xattrs: dict[str, bytes]) -> None:
    """Exactly ``xattrs`` on the entry held by ``fd`` (an O_PATH fd works: the
    calls follow the magic link to that inode and to nothing else); a default
    ACL of the parent may have given a new node one it did not have."""
    path = proc_path(fd)
    for name in os.listxattr(path):
        if name not in xattrs:
            os.removexattr(path, name)
    for name, value in xattrs.items():
        os.setxattr(path, name, value)


def walk_to(root_fd: int, rel_dir: str) -> int:
    """An fd of ``root/rel_dir``, opened one component at a time without
    following a symlink anywhere."""
    parts = [p for p in rel_dir.split("/") if p]
    if any(part in (".", "..") for part in parts):
        raise ValueError("a '.' or '..' component")
    return descend(os.dup(root_fd), parts)


# -- what arrived: without privilege unless private ------------------------------------


def parse_fake_stat(value: bytes) -> tuple[int, int, int] | None:
    """Mode, uid, gid from rsync's ``user.rsync.%stat`` ("MODE MAJ,MIN UID:GID",
    mode in octal), or None if it is not in that form."""
    try:
        mode, _rdev, owner = value.decode("ascii").split()
        uid, gid = owner.split(":")
        return int(mode, 8), int(uid), int(gid)
    except ValueError:
        return None


def unprivilege(root_fd: int, report: Report) -> None:
    """Take every privilege out of the tree rsync wrote (inside the private
    wrapper, before any of it moves into DIR): the gate's ``--fake-super``
    should have kept it all from arriving, and this makes sure of it whatever
    the gate let through. Modes are put back as the snapshot had them, without
    the setuid/setgid bits (--fake-super makes them at least u+rw)."""
    uid, gid = os.geteuid(), os.getegid()
    groups = {gid, *os.getgroups()}
    for dirpath, dirnames, filenames, dirfd in os.fwalk(dir_fd=root_fd, topdown=False):
        times = os.fstat(dirfd)
        unprivilege_dir(dirpath, [*dirnames, *filenames], dirfd, report, uid, gid, groups)
        # a symlink put back or a node removed touched the dir: give it rsync's times
        if os.fstat(dirfd).st_mtime_ns != times.st_mtime_ns:
            os.utime(dirfd, ns=(times.st_atime_ns, times.st_mtime_ns))


def unprivilege_dir(dirpath: str, names: list[str], dirfd: int, report: Report, uid: int,
                    gid: int, groups: set[int]) -> None:
    for name in names:
        rel = os.path.normpath(os.path.join(dirpath, name))
        try:
            fd = os.open(name, PATH_FLAGS, dir_fd=dirfd)
        except OSError as e:
            report.refuse(rel, f"cannot open it: {e.strerror}")
            continue
        try:
            dropped = unprivilege_one(fd, dirfd, name, uid, gid, groups)
        except OSError as e:
            report.refuse(rel, f"cannot take its privilege away: {e.strerror}")
            with contextlib.suppress(OSError):
                remove_entry(dirfd, name)
            continue
        finally:
            os.close(fd)
        if dropped:
            report.strip(rel, dropped)


def remove_entry(dirfd: int, name: str) -> None:
    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dirfd)
    else:
        os.unlink(name, dir_fd=dirfd)


def unprivilege_one(fd: int, dirfd: int, name: str, uid: int, gid: int,
                    groups: set[int]) -> list[str]:
    st = os.fstat(fd)
    if stat.S_ISLNK(st.st_mode):
        return []  # a symlink carries no privilege (and its mode means nothing)
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        os.unlink(name, dir_fd=dirfd)  # --drop-D should have kept it out
        return ["device node (not created)"]
    path = proc_path(fd)
    dropped: list[str] = []
    mode, want_uid, want_gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    names = os.listxattr(path)
    fake = os.getxattr(path, FAKE_SUPER + "%stat") if FAKE_SUPER + "%stat" in names else None
    parsed = parse_fake_stat(fake) if fake is not None else None
    if parsed and stat.S_ISLNK(parsed[0]) and stat.S_ISREG(st.st_mode):
        make_symlink(fd, dirfd, name, st)
        return []
    if parsed:
        mode, want_uid, want_gid = stat.S_IMODE(parsed[0]), parsed[1], parsed[2]
        if stat.S_IFMT(parsed[0]) not in (0, stat.S_IFMT(st.st_mode)):
            dropped.append("device node or special file (an empty file instead)")
    if mode & stat.S_ISUID:
        dropped.append("setuid bit")
    if mode & stat.S_ISGID:
        dropped.append("setgid bit")
    if want_uid != uid:
        dropped.append(f"owner uid {want_uid}")
    if want_gid not in groups:
        dropped.append(f"group gid {want_gid}")
    for xname in names:
        if xname.startswith(FAKE_SUPER):
            kept = xname[len(FAKE_SUPER):]
            if kept in ("%aacl", "%dacl"):
                dropped.append("ACL" if kept == "%aacl" else "default ACL")
            elif kept != "%stat":
                dropped.append(f"xattr {kept}")
            os.removexattr(path, xname)
        elif not xname.startswith("user."):
            dropped.append(f"xattr {xname}")
            os.removexattr(path, xname)
    if st.st_uid != uid or st.st_gid not in groups:
        os.chown(path, uid, gid)
    new = mode & ~SPECIAL_BITS
    if stat.S_IMODE(os.fstat(fd).st_mode) != new:
        os.chmod(path, new)
    return dropped


def make_symlink(fd: int, dirfd: int, name: str, st: os.stat_result) -> None:
    """Turn the file --fake-super wrote for a symlink (its target as content:
    Linux keeps no user xattrs on symlinks) back into the symlink."""
    if st.st_size > 4096:
        raise OSError(36, "symlink target too long")
    # the magic link reopens exactly the inode held (fstat said: a regular file)
    with open(os.open(proc_path(fd), os.O_RDONLY | os.O_CLOEXEC), "rb") as f:
        target = f.read(4097)
    tmp = f".{name[:200]}.bakgrab-link-{secrets.token_hex(4)}"
    os.symlink(target, tmp, dir_fd=dirfd)
    try:
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dirfd,
                 follow_symlinks=False)
        os.replace(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dirfd)
        raise


# -- device nodes and FIFOs ------------------------------------------------------------


def recreate_specials(root_fd: int, entries: Any, private: bool,
                      report: Report | None = None) -> tuple[int, list[str]]:
    """Make the device nodes and FIFOs the worker listed, under ``root_fd``
    (the received tree, inside the private wrapper): the parent is reached
    one component at a time without following symlinks, the name must not
    exist yet, and every change after mknod goes through the fd of the node
    just made, checked to be it. Device nodes only when ``private``; without,
    a FIFO is made as this user's, without setuid/setgid bits and with only
    ``user.*`` xattrs (reported)."""
    if not isinstance(entries, list):
        return 0, []
    report = report or Report()
    uid, gid = os.geteuid(), os.getegid()
    made, skipped = 0, []
    for entry in entries:
        path = entry.get("path") if isinstance(entry, dict) else None
        try:
            rel = check_paths([entry["path"]])[0]
            mode, want_uid, want_gid = int(entry["mode"]), int(entry["uid"]), int(entry["gid"])
            kind = stat.S_IFMT(mode)
            if kind not in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO) or rel == ".":
                raise ValueError("not a device node or FIFO")
            if kind != stat.S_IFIFO and not private:
                raise ValueError("a device node, and the staging dir is not private "
                                 "(restore into a new --into path: bakgrab creates it 0700)")
            rdev = os.makedev(int(entry["major"]), int(entry["minor"])) if kind != stat.S_IFIFO \
                else 0
            xattrs = {str(k): base64.b64decode(v) for k, v in (entry.get("xattrs") or {}).items()}
            ns = int(entry["mtime_ns"])
            dropped: list[str] = []
            if not private:
                dropped += [f"{b} bit" for bit, b in ((stat.S_ISUID, "setuid"),
                                                       (stat.S_ISGID, "setgid")) if mode & bit]
                if want_uid != uid:
                    dropped.append(f"owner uid {want_uid}")
                if want_gid != gid:
                    dropped.append(f"group gid {want_gid}")
                dropped += [f"xattr {k}" for k in xattrs if not k.startswith("user.")]
                mode &= ~SPECIAL_BITS
                want_uid, want_gid = uid, gid
                xattrs = {k: v for k, v in xattrs.items() if k.startswith("user.")}
            make_special(root_fd, rel, kind, stat.S_IMODE(mode), rdev, want_uid, want_gid,
                         xattrs, ns)
            made += 1
            if dropped:
                report.strip(rel, dropped)
        except (OSError, ValueError, KeyError, TypeError, BakgrabError) as e:
            log.warning("not recreated: %r: %s", path, e)
            skipped.append(str(path)[:4096])
    return made, skipped


def make_special(root_fd: int, rel: str, kind: int, mode: int, rdev: int, uid: int, gid: int,
                 xattrs: dict[str, bytes], mtime_ns: int) -> None:
    """One node, made 0600 and changed only through its own fd (issue 12)."""
    pfd = walk_to(root_fd, os.path.dirname(rel))
    name = os.path.basename(rel)
    try:
        before = os.fstat(pfd)
        os.mknod(name, 0o600 | kind, rdev, dir_fd=pfd)
        fd = os.open(name, PATH_FLAGS, dir_fd=pfd)
        try:
            st = os.fstat(fd)
            if (stat.S_IFMT(st.st_mode) != kind or st.st_uid != os.geteuid()
                    or st.st_nlink != 1 or (kind != stat.S_IFIFO and st.st_rdev != rdev)):
                raise ValueError("the new node was replaced before it could be set up")
            path = proc_path(fd)
            os.chown(path, uid, gid)
            os.chmod(path, mode)  # after chown, which clears setuid/setgid
            set_xattrs(fd, xattrs)
            os.utime(path, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)
        # the new entry touched its parent: give it back rsync's times
        os.utime(pfd, ns=(before.st_atime_ns, before.st_mtime_ns))
    finally:
        os.close(pfd)


# -- out of the wrapper into DIR -------------------------------------------------------


def merge(src_fd: int, dst_fd: int, rel: str, private: bool, report: Report) -> None:
    """Move every entry of ``src_fd`` into ``dst_fd`` by rename: new names
    and replaced files at once, existing directories merged into (their
    attributes then become the snapshot's, as rsync would make them).
    ``dst_fd`` is DIR or a directory under it that no other user can write."""
    for name in sorted(os.listdir(src_fd)):
        path = f"{rel}/{name}" if rel else name
        try:
            merge_one(src_fd, dst_fd, name, path, private, report)
        except OSError as e:
            report.refuse(path, f"cannot move it into place: {e.strerror}")


def merge_one(src_fd: int, dst_fd: int, name: str, path: str, private: bool,
              report: Report) -> None:
    src = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
    try:
        dst = os.stat(name, dir_fd=dst_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        return
    if stat.S_ISDIR(src.st_mode) and stat.S_ISDIR(dst.st_mode):
        into = os.open(name, DIR_FLAGS, dir_fd=dst_fd)
        try:
            st = os.fstat(into)
            if others_can_write(st):
                report.refuse(path, f"the existing directory is owned by uid {st.st_uid} "
                                    f"or writable by others (mode {stat.S_IMODE(st.st_mode):04o})")
                return
            sub = os.open(name, DIR_FLAGS, dir_fd=src_fd)
            try:
                merge(sub, into, path, private, report)
                copy_dir_attrs(sub, into)
            finally:
                os.close(sub)
        finally:
            os.close(into)
    elif not stat.S_ISDIR(src.st_mode) and not stat.S_ISDIR(dst.st_mode):
        os.replace(name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
    else:
        report.refuse(path, "a directory and a file of the same name (nothing is deleted "
                            "in a restore)")


def copy_dir_attrs(src: int, dst: int) -> None:
    """The received dir's owner, mode, xattrs (ACLs among them) and times onto
    the existing one, through their fds."""
    st = os.fstat(src)
    os.fchown(dst, st.st_uid, st.st_gid)
    os.fchmod(dst, stat.S_IMODE(st.st_mode))
    xattrs = {n: os.getxattr(src, n) for n in os.listxattr(src)}
    for n in os.listxattr(dst):
        if n not in xattrs:
            os.removexattr(dst, n)
    for n, v in xattrs.items():
        os.setxattr(dst, n, v)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def check_root(staging: Staging, report: Report) -> None:
    """DIR keeps the mode and owner it had: nothing of the snapshot's root."""
    now = os.fstat(staging.fd)
    was = staging.before
    if (now.st_mode, now.st_uid, now.st_gid) != (was.st_mode, was.st_uid, was.st_gid):
        os.fchown(staging.fd, was.st_uid, was.st_gid)
        os.fchmod(staging.fd, stat.S_IMODE(was.st_mode))
        report.refuse(".", f"the staging dir's mode or owner changed during the restore "
                           f"(to {stat.S_IMODE(now.st_mode):04o} {now.st_uid}:{now.st_gid}); "
                           "put back")
