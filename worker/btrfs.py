"""btrfs subvolume operations for an unprivileged worker, by ioctl (issue 14).

Everything here is what a user without ``CAP_SYS_ADMIN`` may do, found by
experiment on a loop-mounted btrfs (kernel 6.x) with a throwaway user
holding only the worker's six ambient capabilities (see
tests/integration/test_btrfs.py):

* create a subvolume (``BTRFS_IOC_SUBVOL_CREATE``): write access to the
  parent dir only;
* snapshot one (``BTRFS_IOC_SNAP_CREATE_V2``, read-only at birth with
  ``BTRFS_SUBVOL_RDONLY``): the caller must own the source's root dir or
  hold ``CAP_FOWNER`` (a snapshot's root is the client's ``/``, root-owned);
* set or clear the read-only flag (``BTRFS_IOC_SUBVOL_SETFLAGS``): owner or
  ``CAP_FOWNER``;
* delete one (``BTRFS_IOC_SNAP_DESTROY_V2``): only on a filesystem mounted
  with ``user_subvol_rm_allowed``, only when the subvolume is writable (the
  kernel answers EROFS for a read-only one, whatever the capabilities), with
  write and search access to its root and its parent (``CAP_DAC_OVERRIDE``);
* rename a subvolume within its parent dir; moving it to another dir
  rewrites its ``..`` and so needs it writable (EROFS when read-only);
* the subvolume id of an open dir (``BTRFS_IOC_INO_LOOKUP`` with tree id 0)
  and the filesystem's id (``BTRFS_IOC_FS_INFO``); quota group numbers
  (what a snapshot holds alone) are readable by anyone in
  ``/sys/fs/btrfs/FSID/qgroups/0_ID/``, once an operator enabled quotas.

Root-only (``CAP_SYS_ADMIN``), so never used: ``btrfs subvolume sync`` and
``btrfs qgroup show`` (both search the tree), enabling quotas, and
``BTRFS_IOC_DEFRAG``. Hence the free space of a deleted subvolume is seen by
polling ``statvfs`` after ``syncfs`` (:func:`settle`), not by waiting on the
cleaner by id.

A subvolume's root dir has inode number 256 and its own ``st_dev``; files
keep their inode numbers in a snapshot.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import heapq
import os
import stat
import struct
import time
from collections.abc import Iterator
from pathlib import Path

from bakgrab.tasks import caps
from bakgrab.tasks.nofollow import DIR_FLAGS, descend

BTRFS_SUPER_MAGIC = 0x9123683E
FIRST_FREE_OBJECTID = 256
"""The inode number of every subvolume's root dir."""

_MAGIC = 0x94
_IOC_WRITE, _IOC_READ = 1, 2
SUBVOL_RDONLY = 1 << 1
_VOL_ARGS = 4096  # struct btrfs_ioctl_vol_args: __s64 fd; char name[4088]
_VOL_ARGS_V2 = 4096  # fd, transid, flags, unused[4], name[4040]
_NAME_MAX_V2 = 4039
_INO_LOOKUP = 4096  # __u64 treeid, objectid; char name[4080]
_FS_INFO = 1024


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (_MAGIC << 8) | nr


IOC_SUBVOL_CREATE = _ioc(_IOC_WRITE, 14, _VOL_ARGS)
IOC_SNAP_CREATE_V2 = _ioc(_IOC_WRITE, 23, _VOL_ARGS_V2)
IOC_SNAP_DESTROY_V2 = _ioc(_IOC_WRITE, 63, _VOL_ARGS_V2)
IOC_SUBVOL_GETFLAGS = _ioc(_IOC_READ, 25, 8)
IOC_SUBVOL_SETFLAGS = _ioc(_IOC_WRITE, 26, 8)
IOC_INO_LOOKUP = _ioc(_IOC_READ | _IOC_WRITE, 18, _INO_LOOKUP)
IOC_FS_INFO = _ioc(_IOC_READ, 31, _FS_INFO)
IOC_SYNC = _ioc(0, 8, 0)


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("f_bsize", ctypes.c_long),
                ("rest", ctypes.c_byte * 112)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Statfs)]


def fs_type(path: Path) -> int:
    """The ``f_type`` magic of the filesystem holding ``path`` (statfs(2))."""
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return buf.f_type & 0xFFFFFFFF


def on_btrfs(path: Path) -> bool:
    return fs_type(path) == BTRFS_SUPER_MAGIC


@contextlib.contextmanager
def _opendir(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _ioctl(fd: int, request: int, arg: bytes) -> bytearray:
    # A bytes argument is capped at 1024 bytes by Python; a mutable buffer is
    # passed as is (the kernel's structs here are 4096 bytes).
    buf = bytearray(arg)
    fcntl.ioctl(fd, request, buf, True)
    return buf


def _name(name: str, limit: int) -> bytes:
    raw = os.fsencode(name)
    if not raw or b"/" in raw or raw in (b".", b"..") or len(raw) > limit:
        raise ValueError(f"not a subvolume name: {name!r}")
    return raw


def is_subvolume(path: Path) -> bool:
    """Whether ``path`` (not followed if a symlink) is a subvolume's root dir."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_ino == FIRST_FREE_OBJECTID and on_btrfs(path)


def create(path: Path) -> None:
    """Make an empty subvolume at ``path`` (its parent must exist)."""
    args = struct.pack("q4088s", 0, _name(path.name, 4087))
    with _opendir(path.parent) as parent:
        _ioctl(parent, IOC_SUBVOL_CREATE, args)


def snapshot(source: Path, dest: Path, *, readonly: bool = False) -> None:
    """Snapshot subvolume ``source`` as ``dest`` (atomic: ``dest`` appears
    whole), read-only from its first moment when asked."""
    with _opendir(source) as src, _opendir(dest.parent) as parent:
        args = struct.pack("qQQ32s4040s", src, 0, SUBVOL_RDONLY if readonly else 0, b"",
                           _name(dest.name, _NAME_MAX_V2))
        _ioctl(parent, IOC_SNAP_CREATE_V2, args)


def delete(path: Path) -> None:
    """Delete subvolume ``path`` (made writable first: the kernel refuses to
    let a user without CAP_SYS_ADMIN delete a read-only one). Its name is gone
    at once; its blocks come back when btrfs's cleaner has run."""
    set_readonly(path, False)
    args = struct.pack("qQQ32s4040s", 0, 0, 0, b"", _name(path.name, _NAME_MAX_V2))
    with _opendir(path.parent) as parent:
        _ioctl(parent, IOC_SNAP_DESTROY_V2, args)


def readonly(path: Path) -> bool:
    with _opendir(path) as fd:
        buf = _ioctl(fd, IOC_SUBVOL_GETFLAGS, b"\0" * 8)
    return bool(struct.unpack("Q", buf)[0] & SUBVOL_RDONLY)


def set_readonly(path: Path, value: bool) -> None:
    with _opendir(path) as fd:
        flags = struct.unpack("Q", _ioctl(fd, IOC_SUBVOL_GETFLAGS, b"\0" * 8))[0]
        want = flags | SUBVOL_RDONLY if value else flags & ~SUBVOL_RDONLY
        if want != flags:
            _ioctl(fd, IOC_SUBVOL_SETFLAGS, struct.pack("Q", want))


def subvolume_id(path: Path) -> int:
    """The id of the subvolume that holds ``path`` (unprivileged INO_LOOKUP)."""
    with _opendir(path) as fd:
        buf = _ioctl(fd, IOC_INO_LOOKUP, struct.pack("QQ4080s", 0, FIRST_FREE_OBJECTID, b""))
    return int(struct.unpack_from("Q", buf)[0])


def fsid(path: Path) -> str:
    """The filesystem's UUID as sysfs names it (``BTRFS_IOC_FS_INFO``)."""
    with _opendir(path) as fd:
        buf = _ioctl(fd, IOC_FS_INFO, b"\0" * _FS_INFO)
    raw = buf[16:32].hex()  # max_id, num_devices, then fsid[16]
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


def qgroup_dir(path: Path) -> Path:
    return Path("/sys/fs/btrfs") / fsid(path) / "qgroups"


def exclusive_bytes(path: Path) -> int | None:
    """What subvolume ``path`` holds alone (its level-0 quota group's
    ``exclusive``), or None when quotas are off on the filesystem."""
    node = qgroup_dir(path) / f"0_{subvolume_id(path)}" / "exclusive"
    try:
        return int(node.read_text())
    except (OSError, ValueError):
        return None


def quotas_enabled(path: Path) -> bool:
    return qgroup_dir(path).is_dir()


def quotas_consistent(path: Path) -> bool:
    """Quotas are on and their numbers are up to date (no rescan pending)."""
    try:
        return (qgroup_dir(path) / "inconsistent").read_text().strip() == "0"
    except OSError:
        return False


def sync(path: Path) -> None:
    """Commit the filesystem's transaction and wake btrfs's cleaner, which
    frees deleted subvolumes (``BTRFS_IOC_SYNC``, unprivileged). A plain
    syncfs(2) commits but leaves the cleaner asleep until the next periodic
    commit (30 s by default): measured, a deleted subvolume's blocks came
    back only then."""
    with _opendir(path) as fd:
        fcntl.ioctl(fd, IOC_SYNC, 0)


SETTLE_POLL = 0.2
SETTLE_STEADY = 3
"""Polls in a row without more free space before a deletion counts as settled."""
SETTLE_MAX = 60.0


def settle(path: Path, enough: int | None = None, *, timeout: float = SETTLE_MAX) -> int:
    """Free bytes of the filesystem once deleted subvolumes' blocks came back:
    commit, measure, and repeat while the free space still grows (btrfs's
    cleaner frees a dropped tree over several transactions), until it has
    been steady for :data:`SETTLE_STEADY` polls, reaches ``enough``, or
    ``timeout`` passed. Waiting on the cleaner by subvolume id would need
    CAP_SYS_ADMIN."""
    deadline = time.monotonic() + timeout
    best = -1
    steady = 0
    while True:
        sync(path)
        st = os.statvfs(path)
        free = st.f_bavail * st.f_frsize
        if enough is not None and free >= enough:
            return free
        if free > best:
            best, steady = free, 0
        else:
            steady += 1
        if steady >= SETTLE_STEADY or time.monotonic() >= deadline:
            return free
        time.sleep(SETTLE_POLL)


# -- hard links and rsync --inplace ---------------------------------------------------

FICLONE = 0x40049409


def _open_parent(root: Path, rel: str) -> tuple[int, str]:
    """An fd of the dir holding ``root/rel`` reached without following any
    symlink (``root`` is a client-written tree), and the last name."""
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"not a relative path: {rel!r}")
    return descend(os.open(root, DIR_FLAGS), parts[:-1]), parts[-1]


def unshare(root: Path, rel: str, ino: int) -> bool:
    """Give ``root/rel``, a link of the multiply-linked inode ``ino``, an
    inode of its own: a reflink clone (no data is copied) with the same
    owner, mode, xattrs (ACLs and file capabilities among them) and times,
    renamed over it. False when the path is not that inode any more.

    Why (measured, issue 14): ``rsync --inplace`` writes into the existing
    inode, so with two paths linked in the previous snapshot that the client
    no longer links, writing the second one changes the first too: the new
    snapshot silently held one file's content at another's path."""
    dfd, name = _open_parent(root, rel)
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if st.st_ino != ino or not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
            return False
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                      dir_fd=dfd)
        tmp = f".bakgrab-unshare.{ino}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)
        try:
            new = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o600, dir_fd=dfd)
            try:
                fcntl.ioctl(new, FICLONE, src)
                # chown first: it clears setuid bits and file capabilities
                os.fchown(new, st.st_uid, st.st_gid)
                os.fchmod(new, stat.S_IMODE(st.st_mode))
                for attr in os.listxattr(src):
                    os.setxattr(new, attr, os.getxattr(src, attr))
                os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(new)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        finally:
            os.close(src)
        return True
    finally:
        os.close(dfd)


def linked_files(root: Path) -> dict[int, list[str]]:
    """Every regular file under ``root`` with more than one link, by inode:
    its paths (relative), found by a walk that follows no symlink."""
    out: dict[int, list[str]] = {}
    for path, st in _files(root):
        if st.st_nlink > 1 and stat.S_ISREG(st.st_mode):
            out.setdefault(st.st_ino, []).append(os.path.relpath(path, root))
    return out


# -- space per snapshot without quotas: FIEMAP (unprivileged) --------------------------

FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_HEAD = struct.Struct("QQIIII")
_FIEMAP_EXTENT = struct.Struct("QQQQQI12x")
_EXTENTS_PER_CALL = 64
EXTENT_LAST = 0x1
EXTENT_UNKNOWN = 0x2
EXTENT_DELALLOC = 0x4
EXTENT_NOT_ALIGNED = 0x100
EXTENT_DATA_INLINE = 0x200
EXTENT_SHARED = 0x2000


def file_extents(fd: int) -> Iterator[tuple[int, int, int]]:
    """(physical, length, flags) of each data extent of the open file ``fd``
    (FS_IOC_FIEMAP, what ``filefrag`` and ``btrfs filesystem du`` read)."""
    start = 0
    while True:
        buf = bytearray(_FIEMAP_HEAD.size + _EXTENT_PER_CALL_BYTES)
        _FIEMAP_HEAD.pack_into(buf, 0, start, 0xFFFFFFFFFFFFFFFF - start, 0, 0,
                               _EXTENTS_PER_CALL, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        mapped = _FIEMAP_HEAD.unpack_from(buf)[3]
        if not mapped:
            return
        last = False
        for i in range(mapped):
            logical, physical, length, _, _, flags = _FIEMAP_EXTENT.unpack_from(
                buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size)
            yield physical, length, flags
            start = logical + length
            last = last or bool(flags & EXTENT_LAST)
        if last:
            return


_EXTENT_PER_CALL_BYTES = _EXTENTS_PER_CALL * _FIEMAP_EXTENT.size


def _files(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    for dirpath, dirnames, filenames in os.walk(root):
        for fn in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, fn)
            with contextlib.suppress(FileNotFoundError):
                yield path, os.lstat(path)


def _extents_of(path: str, st: os.stat_result) -> list[tuple[int, int, int]]:
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return []
    try:
        with caps.raised("dac_override"):  # (client-owned 0600 files)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK
                         | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        # inline and not-yet-allocated extents have no place of their own
        return [e for e in file_extents(fd)
                if not e[2] & (EXTENT_DATA_INLINE | EXTENT_UNKNOWN | EXTENT_DELALLOC)]
    except OSError:
        return []
    finally:
        os.close(fd)


def alone(root: Path) -> tuple[int, int]:
    """Bytes and inodes snapshot ``root`` holds alone: its data extents that
    nothing else on the filesystem references (FIEMAP's SHARED flag clear),
    and its inodes (each subvolume has its own): a walk. Where an operator
    enabled quotas and they are consistent, the quota group's ``exclusive``
    says the bytes without a walk (inodes then 0: btrfs has no inode limit)."""
    if quotas_consistent(root):
        found = exclusive_bytes(root)
        if found is not None:
            return found, 0
    nbytes = inodes = 0
    seen: set[int] = set()
    inodes += sum(1 for _ in os.walk(root))  # the dirs
    for path, st in _files(root):
        if st.st_nlink > 1:
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
        inodes += 1
        for _physical, length, flags in _extents_of(path, st):
            if not flags & EXTENT_SHARED:
                nbytes += length
    return nbytes, inodes


def walk_name(roots: list[Path]) -> tuple[list[tuple[int, int]], int]:
    """:func:`bakgrab.worker.retention.walk_name` for subvolume snapshots
    (oldest first): what each frees when removed in that order, by data
    extent (an extent counts once, for the newest snapshot that references
    it) and by inode (number and ctime, which a snapshot keeps). Extents
    other names reference too are not found by this walk (they are rare:
    reflinks or dedupe across names), so nothing is reported shared."""
    freed = [[0, 0] for _ in roots]
    # (start, end) of disk -> the newest snapshot referencing exactly it; a
    # file changed in place references parts of its old extents, so ranges
    # overlap and are resolved byte by byte in newest_owner()
    ranges: dict[tuple[int, int], int] = {}
    inode_owner: dict[tuple[int, int], int] = {}
    for k, root in enumerate(roots):
        freed[k][1] += sum(1 for _ in os.walk(root))  # the dirs
        for path, st in _files(root):
            key = (st.st_ino, st.st_ctime_ns)
            if inode_owner.get(key) == k:
                continue  # a hard link inside this snapshot
            inode_owner[key] = k
            for physical, length, _ in _extents_of(path, st):
                ranges[(physical, physical + length)] = k
    for k in inode_owner.values():
        freed[k][1] += 1
    for k, nbytes in enumerate(newest_owner(ranges, len(roots))):
        freed[k][0] += nbytes
    return [(b, i) for b, i in freed], 0


def newest_owner(ranges: dict[tuple[int, int], int], n: int) -> list[int]:
    """For each owner ``k < n``: the bytes of disk whose highest owner among
    the ``[start, end)`` ranges covering them is ``k`` (each byte once)."""
    out = [0] * n
    starts = sorted((s, e, k) for (s, e), k in ranges.items() if e > s)
    points = sorted({p for s, e, _ in starts for p in (s, e)})
    heap: list[tuple[int, int]] = []  # (-owner, end)
    i = 0
    for a, b in zip(points, points[1:], strict=False):
        while i < len(starts) and starts[i][0] <= a:
            heapq.heappush(heap, (-starts[i][2], starts[i][1]))
            i += 1
        while heap and heap[0][1] <= a:
            heapq.heappop(heap)
        # (a range ending inside the heap, under a higher owner, is popped
        # once it reaches the top: ends only matter there)
        if heap:
            out[-heap[0][0]] += b - a
    return out


def errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))
