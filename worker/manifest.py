"""The manifest of a snapshot: what every regular file in it must read as (issue 15).

::

    STORAGE/.bakgrab/meta/SNAPSHOT.manifest     one per snapshot, beside its
                                                SNAPSHOT.json, never inside it

A manifest is JSON lines: a header, one ``[path, size, mtime_ns, inode,
digest]`` line per regular file (paths relative to the snapshot root, as
``os.fsdecode`` gives them: a non-UTF-8 byte survives as a surrogate escape),
and a trailer holding the count of entries and the SHA-256 of every byte
before it. So a damaged manifest (a bad trailer, a line that does not parse)
is told apart from damaged data: :func:`load` raises :class:`Damaged` and
never returns a half-read manifest.

A digest names its hash: ``xxh128:HEX`` (what this version writes, and what
rsync's receiver computes anyway, issue 19) or ``sha256:HEX`` (version 1
manifests wrote every digest as SHA-256 hex, unnamed; an unchanged file
keeps its entry, so both kinds mix). The hash guards against damage, not
against a forger: no other name ever compares a digest of this one's
(:mod:`bakgrab.worker.verify`).

Building one (:func:`build`) hashes only what the pull changed. On the
hard-link backend an unchanged file is the very inode of the previous
snapshot (``rsync --link-dest`` linked it), so its entry is taken from the
previous manifest when inode, size and mtime agree; every other inode is read
once, however many paths it has. rsync's itemized list of the files it wrote
(``>f`` lines, in transfer order) drives the reading: a :class:`Prehasher`
thread reads each file as rsync finishes it, while its bytes are in the
page cache and while rsync goes on; :func:`build` reads after the pull only
what that missed, in rsync's order first. Identity is decided by the inode,
never by the itemized names alone: rsync escapes unusual names in what it
prints, and a resumed pull does not list the files an earlier attempt wrote.

And where one rsync run wrote the whole tree from empty (a first pull, or
any pull on the hard-link backend that did not resume), it reads hardly
anything: rsync's receiver checks each file it receives against the
whole-file checksum the sender sent, xxh128 between two rsyncs >= 3.2, and
prints it (:data:`bakgrab.worker.rsync.ITEM_FORMAT`). The client can make
the worker's rsync print any text among those lines; only lines holding the
run's marker count (:func:`bakgrab.worker.rsync.new_marker`), and even they
are claims: :func:`trusted_claims` says which can stand for a read, and one
file read proves their kind (:func:`prove`); the Prehasher stops once its
first file agrees with its line (issue 19).

A second backend (copy-on-write) can reuse all of this with its own notion
of "the same file": :func:`build` takes the previous entries keyed by inode,
which a CoW snapshot keeps too (a subvolume snapshot keeps inode numbers).

Invariants: a manifest appears by one rename, after it was fsynced; a file
is opened with ``O_NOFOLLOW`` and read only when it is still the regular
file (same inode) the walk saw, so a path never leads a read elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import queue
import stat
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import xxhash

from bakgrab.tasks import caps
from bakgrab.tasks.errors import TransferInterrupted
from bakgrab.tasks.nofollow import DIR_FLAGS, descend
from bakgrab.worker.storage import Storage, fsync_dir

log = logging.getLogger(__name__)

VERSION = 2
READS = (1, 2)
"""The versions :func:`parse` reads (1: every digest SHA-256 hex, unnamed)."""
SUFFIX = ".manifest"
HASH = "xxh128"
"""The hash of the files the worker reads itself: rsync's own (issue 19),
and some 40 times faster than SHA-256 here."""
HASHES = {"xxh128": 32, "sha256": 64}
"""The hashes a digest may name, with their hex lengths."""
CHUNK = 1 << 20
"""Bytes per read when hashing: large reads, few syscalls."""


class Damaged(Exception):
    """A manifest that exists but cannot be trusted (checksum or format)."""


class Entry(NamedTuple):
    """One regular file of a snapshot (a tuple: a manifest makes tens of
    thousands, and a frozen dataclass costs three times as much to make)."""

    path: str
    size: int
    mtime_ns: int
    ino: int
    digest: str
    """``HASH:HEX`` (:data:`HASHES`)."""


@dataclasses.dataclass
class Manifest:
    """A loaded, checksum-verified manifest."""

    snapshot: str
    entries: list[Entry]
    created: float = 0.0
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def by_ino(self) -> dict[int, Entry]:
        """One entry per inode (the first path of a hard-linked file)."""
        out: dict[int, Entry] = {}
        for e in self.entries:
            out.setdefault(e.ino, e)
        return out


def path_of(storage: Storage, snapshot: str) -> Path:
    return storage.meta(snapshot, SUFFIX)


# -- reading and writing -------------------------------------------------------

_json_str = json.encoder.encode_basestring_ascii  # (json.dumps's, for a str)


def dump_lines(snapshot: str, entries: Iterable[Entry], info: dict[str, Any] | None = None,
               created: float | None = None) -> Iterator[bytes]:
    """The manifest's lines, trailer last (its checksum covers every line before)."""
    digest = hashlib.sha256()
    header = {"bakgrab_manifest": VERSION, "snapshot": snapshot, "hashes": sorted(HASHES),
              "created": time.time() if created is None else created, "info": info or {}}
    count = 0
    line = (json.dumps(header, sort_keys=True) + "\n").encode()
    digest.update(line)
    yield line
    for e in entries:
        # json.dumps([path, size, mtime_ns, ino, digest]) to the byte, at a
        # third of its cost (issue 19): the same string escaper it uses
        # (ensure_ascii), ints as int's repr, as json writes them
        line = (f"[{_json_str(e.path)}, {int.__repr__(e.size)}, {int.__repr__(e.mtime_ns)}, "
                f"{int.__repr__(e.ino)}, {_json_str(e.digest)}]\n").encode()
        digest.update(line)
        count += 1
        yield line
    yield (json.dumps({"end": count, "sha256": digest.hexdigest()}) + "\n").encode()


def write(path: Path, snapshot: str, entries: Iterable[Entry],
          info: dict[str, Any] | None = None) -> None:
    """Write a manifest by a rename, so a reader sees all of it or none."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb", buffering=1 << 20) as f:
        for line in dump_lines(snapshot, entries, info):
            f.write(line)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fsync_dir(path.parent)


def parse(data: bytes, snapshot: str | None = None) -> Manifest:
    """A manifest from its bytes; :class:`Damaged` unless every check holds."""
    lines = data.split(b"\n")
    if len(lines) < 3 or lines[-1] != b"":
        raise Damaged("truncated (no trailer line)")
    body, trailer_line = lines[:-2], lines[-2]
    try:
        trailer = json.loads(trailer_line)
        expected, count = str(trailer["sha256"]), int(trailer["end"])
    except (ValueError, KeyError, TypeError):
        raise Damaged("its trailer does not parse") from None
    digest = hashlib.sha256()
    for line in body:
        digest.update(line + b"\n")
    if digest.hexdigest() != expected:
        raise Damaged("its checksum does not match its content")
    if count != len(body) - 1:
        raise Damaged(f"its trailer counts {count} entries, it holds {len(body) - 1}")
    try:
        header = json.loads(body[0])
        version = header.get("bakgrab_manifest")
        if version not in READS or (version == 1 and header.get("hash") != "sha256"):
            raise Damaged(f"unknown manifest version or hash: {header!r:.200}")
        entries = []
        for line in body[1:]:
            p, size, mtime_ns, ino, value = json.loads(line)
            value = f"sha256:{value}" if version == 1 else str(value)
            name, _, hexed = value.partition(":")
            if len(hexed) != HASHES.get(name):
                raise ValueError(f"not a digest: {value[:80]!r}")
            entries.append(Entry(str(p), int(size), int(mtime_ns), int(ino), value))
    except (ValueError, TypeError, AttributeError) as e:
        raise Damaged(f"a line does not parse: {e}") from None
    name = str(header.get("snapshot"))
    if snapshot is not None and name != snapshot:
        raise Damaged(f"it is the manifest of {name!r}, not of {snapshot!r}")
    info = header.get("info")
    return Manifest(name, entries, float(header.get("created", 0)),
                    info if isinstance(info, dict) else {})


def load(storage: Storage, snapshot: str) -> Manifest | None:
    """The manifest of ``snapshot``; None when it has none (made before
    manifests existed, or its grab died before writing it); Damaged when it
    cannot be trusted."""
    try:
        data = path_of(storage, snapshot).read_bytes()
    except FileNotFoundError:
        return None
    return parse(data, snapshot)


# -- hashing -------------------------------------------------------------------

FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class Beneath:
    """Opens files of one tree by relative path without following a symlink
    anywhere on the way (a client-written tree may hold one where a
    directory was, pointing anywhere); the fd of the last directory is kept,
    so the files of one directory cost one open each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dir: tuple[str, int] | None = None

    def __enter__(self) -> Beneath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._dir is not None:
            os.close(self._dir[1])
            self._dir = None

    def parent(self, rel: str) -> tuple[int, str]:
        """The fd of ``rel``'s directory (owned by this object) and its last name."""
        head, _, name = rel.rpartition("/")
        if self._dir is not None and self._dir[0] == head:
            return self._dir[1], name
        # (the root is bakgrab's own: it may be reached through a symlink)
        fd = descend(os.open(self.root, DIR_FLAGS & ~os.O_NOFOLLOW),
                     head.split("/") if head else ())
        self.close()
        self._dir = (head, fd)
        return fd, name

    def open(self, rel: str, ino: int | None = None) -> int:
        """An fd reading the regular file ``rel``: non-blocking (a fifo put in
        its place cannot hang us), checked to be a regular file and, given
        ``ino``, that very inode. ``O_NOATIME`` where permitted: a verify
        must not rewrite every inode."""
        return self.open_stat(rel, ino)[0]

    def open_stat(self, rel: str, ino: int | None = None) -> tuple[int, os.stat_result]:
        """:meth:`open`, and the fd's ``fstat`` that checked it (one syscall
        less for a caller that needs it too: issue 19)."""
        dfd, name = self.parent(rel)
        try:
            fd = os.open(name, FILE_FLAGS | os.O_NOATIME, dir_fd=dfd)
        except PermissionError:
            fd = os.open(name, FILE_FLAGS, dir_fd=dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"{rel!r} is no longer a regular file")
            if ino is not None and st.st_ino != ino:
                raise FileNotFoundError(f"{rel!r} is no longer the inode its manifest names")
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def unlink(self, rel: str) -> None:
        dfd, name = self.parent(rel)
        os.unlink(name, dir_fd=dfd)


def open_regular(root: Path, rel: str, ino: int | None = None) -> int:
    """:meth:`Beneath.open` of one file."""
    with Beneath(root) as tree:
        return tree.open(rel, ino)


_local = threading.local()


def _buffer() -> bytearray:
    """This thread's read buffer: one, not one per file (zeroing a fresh
    MiB for each small file cost more than hashing it; measured)."""
    buf: bytearray | None = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = bytearray(CHUNK)
    return buf


class _Hash(Protocol):
    def update(self, data: memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


NEW: dict[str, Callable[[], _Hash]] = {"xxh128": xxhash.xxh3_128, "sha256": hashlib.sha256}


def hash_of(digest: str) -> str:
    """The hash a digest names (``xxh128`` of ``xxh128:HEX``)."""
    return digest.partition(":")[0]


def hash_fd(fd: int, *, drop_cache: bool = False, size: int | None = None,
            hash: str = HASH) -> tuple[str, int]:
    """The digest (``HASH:HEX``) and byte count of what ``fd`` reads from its start.

    ``drop_cache``: tell the kernel the pages are not needed afterwards (a
    verify reads cold data; it should not evict the hot). ``size``: the
    size an ``fstat`` gave just before; reading stops once that many bytes
    came, without the read that would find the end and, for a file of one
    read, without the readahead advice (two syscalls per small file, issue
    19). Only for a caller that checks afterwards that the size did not
    change (a file that grew may give more bytes)."""
    digest = NEW[hash]()
    buf = _buffer()
    view = memoryview(buf)
    total = 0
    if size is None or size > CHUNK:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    while size is None or total < size:
        n = os.readv(fd, [buf])
        if not n:
            break
        digest.update(view[:n])
        total += n
    if drop_cache:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return f"{hash}:{digest.hexdigest()}", total


# -- building ------------------------------------------------------------------

class Seen(NamedTuple):
    """A regular file as the walk found it."""

    path: str
    size: int
    mtime_ns: int
    ino: int


def walk(root: Path) -> Iterator[Seen]:
    """Every regular file under ``root`` (not following symlinks), by directory."""
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            for entry in it:
                sub = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append(sub)
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    yield Seen(sub, st.st_size, st.st_mtime_ns, st.st_ino)


def unescape(name: bytes) -> str:
    """A name as rsync printed it (``%n``): it writes an unprintable byte as
    ``\\#ooo``, and the backslash of a name's own ``\\#`` and three digits
    as ``\\#134``, so every name reads back as it is."""
    if b"\\#" not in name:
        return name.decode(_FS_ENCODING, "surrogateescape")  # (os.fsdecode's, inline)
    parts = name.split(b"\\#")
    out = bytearray(parts[0])
    for part in parts[1:]:
        code = part[:3]
        if len(code) == 3 and all(48 <= c <= 55 for c in code):
            out.append(int(code, 8) & 0xFF)
            out += part[3:]
        else:
            out += b"\\#" + part
    return os.fsdecode(bytes(out))


_FS_ENCODING = sys.getfilesystemencoding()


@dataclasses.dataclass
class BuildStats:
    files: int = 0
    inodes: int = 0
    reused: int = 0
    hashed: int = 0
    bytes_hashed: int = 0
    seconds: float = 0.0
    vanished: int = 0
    """Files that were no longer the walked inode when read (none after a
    finished pull: nothing else writes the tree)."""
    prehashed: int = 0
    """Inodes a :class:`Prehasher` hashed during the pull."""
    reread: int = 0
    """Files read a second time from the disk (``verify_pull``)."""
    reread_seconds: float = 0.0
    reread_bad: list[str] = dataclasses.field(default_factory=list)
    """Files whose second read differed from the first."""
    claimed: int = 0
    """Inodes whose digest is the checksum rsync's receiver verified (issue 19)."""
    claims_refused: int = 0
    """Inodes rsync's lines made claims for that could not stand (read instead)."""
    claims: str = "off"
    """Whether the claims were used: "off" (not this pull's to make: resumed,
    btrfs...), "none", "used", or "refused: why"."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Claims:
    """The checksums rsync's lines claimed during one pull that wrote the
    whole tree, starting empty (:class:`bakgrab.worker.rsync.Items`)."""

    digests: Mapping[bytes, bytes]
    """Escaped name: xxh128 hex as printed, or b"" where lines disagreed."""
    others: Collection[bytes] = ()
    """Escaped names of regular files on lines that claim nothing (``cf``...)."""


def trusted_claims(claims: Claims, seen: list[Seen], known: Mapping[int, Entry],
                   names: Mapping[bytes, str] | None = None
                   ) -> tuple[dict[int, tuple[str, str]], int]:
    """The claims that can stand for a read, by inode (the claiming path and
    its digest), and how many inodes had claims that cannot.

    The lines are those that held the run's marker (forged ones lack it:
    :class:`bakgrab.worker.rsync.Items`); still, a claim stands only where
    no other explanation of the inode exists: it was made by this pull
    (not the previous snapshot's, which ``--link-dest`` linked: those have
    their entries); every ``>f`` line naming one of its paths claims the
    same value; and no line that claims nothing names one (``cf``: rsync
    copied a file of the previous snapshot; a received file whose checksum
    was not xxh128's length). Its real ``>f`` line or ``cf`` line is always
    among them, so a line that got past the marker all the same could only
    make an inode be read. Whether
    the claims are xxh128 at all is for the caller to check on one.
    ``names``: the claims' names already unescaped, if the caller has them."""
    digests = {names[n] if names else unescape(n): c for n, c in claims.digests.items()}
    others = {unescape(n) for n in claims.others}
    by_ino: dict[int, tuple[str, bytes] | None] = {}
    for s in seen:
        if s.ino in known:
            continue
        claim = digests.get(s.path)
        if claim is None and s.path not in others:
            continue  # (a second name of a file received once: -H's "hf")
        if s.ino in by_ino and by_ino[s.ino] is None:
            continue  # (refused already)
        got = by_ino.get(s.ino)
        if s.path in others or not claim or (got is not None and got[1] != claim):
            by_ino[s.ino] = None
        elif got is None:
            by_ino[s.ino] = (s.path, claim)
    good = {ino: (got[0], f"xxh128:{got[1].decode('ascii')}")
            for ino, got in by_ino.items() if got is not None}
    return good, len(by_ino) - len(good)


def build(root: Path, previous: Manifest | None, changed: Iterable[bytes] = (),
          *, reread: bool = False, prehashed: dict[int, tuple[int, int, str]] | None = None,
          claims: Claims | None = None) -> tuple[list[Entry], BuildStats]:
    """The entries of the tree at ``root``: an inode the previous manifest
    names with the same size and mtime keeps its digest; one :class:`Prehasher`
    hashed during the pull (same size and mtime) gives its digest; one
    rsync's ``claims`` vouch for (:func:`trusted_claims`, and one of them
    read back to prove they are xxh128) takes the claimed digest; every
    other inode is read once (first those of ``changed``, rsync's itemized
    names, in its order; then the rest in walk order). With ``reread``,
    every inode not kept from the previous manifest is then read again from
    the disk (:func:`reread_from_disk`)."""
    started = time.monotonic()
    stats = BuildStats()
    known = previous.by_ino() if previous is not None else {}
    early = prehashed or {}
    with caps.raised("dac_override"), Beneath(root) as tree:  # client-owned 0700 dirs
        seen = list(walk(root))
        stats.files = len(seen)
        vouched: dict[int, tuple[str, str]] = {}
        names = {raw: unescape(raw) for raw in claims.digests} if claims is not None else {}
        if claims is not None:
            vouched, stats.claims_refused = trusted_claims(claims, seen, known, names)
            stats.claims = prove(tree, vouched, {s.ino: s for s in seen}, early)
            if stats.claims != "used":
                vouched = {}
        # what rsync wrote is read whatever the previous manifest says: on a
        # copy-on-write backend a file rewritten in place keeps its inode
        wrote_paths = [names.get(raw) or unescape(raw) for raw in changed]  # (once each: 19)
        wrote = set(wrote_paths)
        order: list[Seen] = []
        fresh: list[Seen] = []
        digests: dict[int, str] = {}
        todo: dict[int, Seen] = {}
        for s in seen:
            if s.ino in digests or s.ino in todo:
                continue
            old = known.get(s.ino)
            if s.path not in wrote and old is not None and old.size == s.size \
                    and old.mtime_ns == s.mtime_ns:
                digests[s.ino] = old.digest
                stats.reused += 1
                continue
            fresh.append(s)
            pre = early.get(s.ino)
            if pre is not None and pre[0] == s.size and pre[1] == s.mtime_ns:
                digests[s.ino] = pre[2]
                stats.prehashed += 1
            elif s.ino in vouched:
                digests[s.ino] = vouched[s.ino][1]
                stats.claimed += 1
            else:
                todo[s.ino] = s
        stats.inodes = len(digests) + len(todo)
        by_path = {s.path: s for s in todo.values()} if wrote_paths else {}
        for path in wrote_paths:
            hit = by_path.pop(path, None)
            if hit is not None:
                order.append(hit)
        picked = {s.ino for s in order}
        order += [s for s in todo.values() if s.ino not in picked]
        for s in order:
            try:
                fd = tree.open(s.path, s.ino)
            except OSError as e:
                log.warning("manifest: %r not hashed: %s", s.path, e)
                stats.vanished += 1
                continue
            try:
                digests[s.ino], n = hash_fd(fd)
            finally:
                os.close(fd)
            stats.hashed += 1
            stats.bytes_hashed += n
        if reread:
            t = time.monotonic()
            for s in fresh:
                if s.ino in digests and reread_from_disk(tree, s, hash_of(digests[s.ino])) \
                        != digests[s.ino]:
                    stats.reread_bad.append(s.path)
                stats.reread += 1
            stats.reread_seconds = round(time.monotonic() - t, 3)
    entries = [Entry(s.path, s.size, s.mtime_ns, s.ino, digests[s.ino])
               for s in seen if s.ino in digests]
    stats.seconds = round(time.monotonic() - started, 3)
    return entries, stats


def prove(tree: Beneath, vouched: Mapping[int, tuple[str, str]], seen: Mapping[int, Seen],
          early: Mapping[int, tuple[int, int, str]]) -> str:
    """"used" when the vouched claims are xxh128 digests of the files: every
    one a :class:`Prehasher` read too agrees, and at least one was read (the
    smallest, if none was). rsync prints whatever checksum the two rsyncs
    negotiated (md5's has the same length), one for all files, so one read
    tells; else why they are not used."""
    if not vouched:
        return "none"
    checked = 0
    for ino, (path, digest) in vouched.items():
        pre = early.get(ino)
        s = seen[ino]
        if pre is not None and pre[:2] == (s.size, s.mtime_ns) and hash_of(pre[2]) == "xxh128":
            if pre[2] != digest:
                return f"refused: {path!r} does not read as rsync's line claims"
            checked += 1
    if checked:
        return "used"
    ino = min(vouched, key=lambda i: seen[i].size)
    path, digest = vouched[ino]
    try:
        fd = tree.open(path, ino)
    except OSError as e:
        return f"refused: {path!r} could not be read: {e}"
    try:
        got = hash_fd(fd)[0]
    finally:
        os.close(fd)
    if got != digest:
        return f"refused: {path!r} does not read as rsync's line claims (not xxh128?)"
    return "used"


def reread_from_disk(tree: Beneath, s: Seen, hash: str = HASH) -> str | None:
    """The digest of ``s`` as the disk holds it: its dirty pages written
    out, its cached pages dropped, then read (the kernel may keep a page it
    cannot drop, e.g. one mapped by another process: best effort)."""
    try:
        fd = tree.open(s.path, s.ino)
    except OSError:
        return None
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return hash_fd(fd, drop_cache=True, hash=hash)[0]
    except OSError:
        return None
    finally:
        os.close(fd)


class Prehasher:
    """Hashes each file the moment rsync says it finished writing it (issue
    15): its bytes are still in the page cache, however large the backup,
    and the hashing overlaps the pull instead of following it. rsync logs a
    received file after its data only because the pull's format holds
    ``%b`` (:data:`bakgrab.worker.rsync.ITEM_FORMAT`), and renames it into
    place just after: each file is read when the next one's line comes.

    A result counts only for the inode, size and mtime the file had while it
    was read (unchanged before and after); :func:`build` takes it only when
    the finished tree still shows them. A file it could not read is simply
    read by :func:`build`. One thread; :meth:`submit` only queues.

    With ``sample`` (a pull into an empty tree, whose lines' checksums
    :func:`build` may take, issue 19), the first file whose line claims a
    checksum is compared with it once read: when they agree, the rest are
    not read (:func:`build` checks the claims again, and reads what it
    cannot take); when not, all are, as without."""

    def __init__(self, root: Path, *, sample: bool = False) -> None:
        self.root = root
        self.results: dict[int, tuple[int, int, str]] = {}
        self.bytes = 0
        self.cpu_seconds = 0.0
        self.trusting: bool | None = None if sample else False
        """None until the sample was read; then whether the claims held."""
        self._queue: queue.SimpleQueue[tuple[bytes, bytes] | None] = queue.SimpleQueue()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="bakgrab-prehash", daemon=True)

    def __enter__(self) -> Prehasher:
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self._stop = True  # the pull failed: nothing will use the results
        self._queue.put(None)
        self._thread.join()

    def submit(self, name: bytes, claim: bytes = b"") -> None:
        """Queue one name as rsync printed it (escaped), and the checksum its line claimed."""
        if not self.trusting:
            self._queue.put((name, claim))

    def _run(self) -> None:
        start = time.thread_time()
        # rsync's receiver logs a file after its data but before it renames the
        # temp file into place and sets its times (receiver.c: log_item, then
        # finish_transfer), one file after the other: so a file is read once
        # the next one's line came, or the pull ended.
        held: tuple[bytes, bytes] | None = None
        with caps.raised("dac_override"), Beneath(self.root) as tree:
            while True:
                item = self._queue.get()
                if held is not None and not self._stop and not self.trusting:
                    try:
                        self._one(tree, unescape(held[0]), held[1])
                    except (OSError, ValueError) as e:
                        log.debug("prehash of %r skipped: %s", held[0], e)
                if item is None:
                    break
                held = item
        self.cpu_seconds = round(time.thread_time() - start, 3)

    def _one(self, tree: Beneath, rel: str, claim: bytes) -> None:
        fd, before = tree.open_stat(rel)
        try:
            # (reads stop at the size seen before: the check below holds the rest)
            digest, n = hash_fd(fd, size=before.st_size)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        mark = (before.st_size, before.st_mtime_ns, before.st_ctime_ns)
        if mark == (after.st_size, after.st_mtime_ns, after.st_ctime_ns) and n == before.st_size:
            self.results[before.st_ino] = (before.st_size, before.st_mtime_ns, digest)
            self.bytes += n
            if self.trusting is None and claim:
                self.trusting = digest == f"{HASH}:{claim.decode('ascii')}"


def make(storage: Storage, tree: Path, snapshot: str, previous_snapshot: str | None,
         changed: Iterable[bytes] = (), *, reread: bool = False,
         prehashed: dict[int, tuple[int, int, str]] | None = None,
         claims: Claims | None = None, complete: bool = True) -> BuildStats:
    """Build and write the manifest of ``tree``, to be published as ``snapshot``
    (its previous snapshot's manifest, if good, gives the unchanged entries).
    ``claims``: what rsync's lines claimed, when one rsync run wrote the tree
    from empty. ``complete``: False when lines were dropped
    (:data:`bakgrab.worker.rsync.MAX_ITEM_BYTES`): then nothing is kept
    from the previous manifest, and nothing taken from a claim.
    With ``reread`` (``verify_pull``), a file whose second read from the disk
    differs is removed from ``tree`` (a retry pulls it again) and nothing is
    written: :class:`bakgrab.tasks.errors.TransferInterrupted`."""
    previous = None
    if previous_snapshot is not None:
        try:
            previous = load(storage, previous_snapshot)
        except Damaged as e:
            log.warning("manifest of %s is damaged (%s): hashing every file anew",
                        previous_snapshot, e)
        if previous is None:
            claims = None  # (which inodes --link-dest linked is not known)
    if not complete:
        log.warning("manifest of %s: rsync printed more lines than are kept: every file "
                    "is read", snapshot)
        previous = claims = None
    entries, stats = build(tree, previous, changed, reread=reread, prehashed=prehashed,
                           claims=claims)
    if stats.reread_bad:
        with caps.raised("dac_override"), Beneath(tree) as beneath:
            for p in stats.reread_bad:
                with contextlib.suppress(OSError):
                    beneath.unlink(p)
        raise TransferInterrupted(
            f"{len(stats.reread_bad)} file(s) read back from the storage differ from what "
            f"the pull wrote (verify_pull), e.g. {stats.reread_bad[0]!r}: is the storage's "
            "disk failing? They are pulled again")
    write(path_of(storage, snapshot), snapshot, entries, {"build": stats.to_dict()})
    log.info("manifest of %s: %d files, %d hashed during the pull, %d after it (%d bytes), "
             "%d kept, %d by rsync's checksum (%s; %d refused), %.1fs", snapshot, stats.files,
             stats.prehashed, stats.hashed, stats.bytes_hashed, stats.reused, stats.claimed,
             stats.claims, stats.claims_refused, stats.seconds)
    if stats.claims.startswith("refused"):
        log.warning("manifest of %s: rsync's checksums not used: %s", snapshot, stats.claims[9:])
    return stats
