"""Manifests (issue 15): their checksum, the inode reuse that hashes only what
changed, rsync's itemized names, and verify's share rotation on a plain tree."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import xxhash

from bakgrab.worker import damage, manifest, rsync, verify
from bakgrab.worker.storage import Storage


def tree(root: Path, files: int = 5) -> None:
    (root / "a" / "b").mkdir(parents=True)
    for i in range(files):
        (root / "a" / f"f{i}").write_bytes(f"file {i}\n".encode() * (i + 1))
    (root / "a" / "b" / "deep").write_bytes(b"deep\n")
    os.link(root / "a" / "b" / "deep", root / "linked")
    os.symlink("/etc/passwd", root / "a" / "sym")
    os.mkfifo(root / "a" / "fifo")
    (root / os.fsdecode(b"odd-\xff-name")).write_bytes(b"odd")


def sha(data: bytes) -> str:
    """The digest the worker writes for a file it reads itself."""
    return "xxh128:" + xxhash.xxh3_128(data).hexdigest()


def test_build_hashes_every_regular_file_once_per_inode(tmp_path: Path) -> None:
    """A first manifest holds every regular file (not symlinks nor fifos), one
    read per inode, with the content's SHA-256; a non-UTF-8 name round-trips."""
    tree(tmp_path / "t")
    entries, stats = manifest.build(tmp_path / "t", None)
    by_path = {e.path: e for e in entries}
    assert set(by_path) == {"a/f0", "a/f1", "a/f2", "a/f3", "a/f4", "a/b/deep", "linked",
                            os.fsdecode(b"odd-\xff-name")}
    assert by_path["a/f2"].digest == sha(b"file 2\n" * 3)
    assert by_path["linked"].ino == by_path["a/b/deep"].ino
    assert stats.files == 8 and stats.inodes == 7 and stats.hashed == 7 and stats.reused == 0
    path = tmp_path / "m"
    manifest.write(path, "n.2026-01-01.1", entries)
    loaded = manifest.parse(path.read_bytes(), "n.2026-01-01.1")
    assert loaded.entries == entries
    assert os.fsencode(next(e.path for e in loaded.entries if e.path.startswith("odd"))) \
        == b"odd-\xff-name"


def test_build_keeps_entries_of_unchanged_inodes(tmp_path: Path) -> None:
    """A tree made by `rsync --link-dest` from the previous one: only the
    changed file is read; the linked ones keep their previous hash, even when
    their bytes rotted since (the manifest says what the pull stored)."""
    old, new = tmp_path / "old", tmp_path / "new"
    tree(old)
    previous, _ = manifest.build(old, None)
    prev = manifest.Manifest("old", previous)
    src = tmp_path / "src"
    subprocess.run(["rsync", "-aH", f"{old}/", f"{src}/"], check=True)
    (src / "a" / "f1").write_bytes(b"changed")
    with open(old / "a" / "f3", "r+b") as f:  # rot that must not leak into the new manifest
        f.write(b"X")
    st = (src / "a" / "f3").stat()
    os.utime(old / "a" / "f3", ns=(st.st_atime_ns, st.st_mtime_ns))
    subprocess.run(["rsync", "-aH", "--modify-window=-1", f"--link-dest={old}",
                    f"{src}/", f"{new}/"], check=True)
    entries, stats = manifest.build(new, prev, [b"a/f1"])
    assert stats.hashed == 1 and stats.reused == 6
    by_path = {e.path: e for e in entries}
    assert by_path["a/f1"].digest == sha(b"changed")
    assert by_path["a/f3"].digest == sha(b"file 3\n" * 4)


def test_an_itemized_file_is_read_even_with_its_old_inode(tmp_path: Path) -> None:
    """A file rsync says it wrote is read again even if inode, size and mtime
    match the previous manifest (a copy-on-write backend rewrites in place)."""
    tree(tmp_path / "t")
    entries, _ = manifest.build(tmp_path / "t", None)
    target = tmp_path / "t" / "a" / "f0"
    st = target.stat()
    target.write_bytes(b"FILE 0\n")  # same size
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    again, stats = manifest.build(tmp_path / "t", manifest.Manifest("x", entries), [b"a/f0"])
    assert stats.hashed == 1
    assert next(e for e in again if e.path == "a/f0").digest == sha(b"FILE 0\n")


def test_a_damaged_manifest_is_told_apart(tmp_path: Path) -> None:
    """Any changed byte, a lost line or a lost trailer makes the manifest
    Damaged, never a shorter manifest."""
    tree(tmp_path / "t")
    entries, _ = manifest.build(tmp_path / "t", None)
    data = b"".join(manifest.dump_lines("s", entries))
    manifest.parse(data, "s")
    lines = data.split(b"\n")
    flipped = bytearray(data)
    flipped[data.index(b"f3")] = ord("g")
    for bad in (bytes(flipped), b"\n".join(lines[:2] + lines[3:]), b"\n".join(lines[:-2]) + b"\n",
                data[:-1], b""):
        with pytest.raises(manifest.Damaged):
            manifest.parse(bad, "s")
    with pytest.raises(manifest.Damaged, match="not of"):
        manifest.parse(data, "other")


def test_entry_lines_are_json_dumps_of_the_entry_to_the_byte() -> None:
    """Each entry line is what ``json.dumps([path, size, mtime_ns, ino,
    sha256])`` writes (the format manifests were written in, issue 15):
    quotes, backslashes, control and non-ASCII characters, a non-UTF-8
    byte's surrogate escape, an astral character, zero and huge numbers."""
    paths = ['plain', 'a "quoted"\\ path', "tab\there\nnew\x00\x1f\x7f", "é/ü/ß",
             os.fsdecode(b"odd-\xff\x80-name"), "\U0001f600 emoji", "/", ""]
    entries = [manifest.Entry(p, i * 1_000_003, 1_700_000_000_123_456_789 + i, 2**63 + i,
                              sha(p.encode(errors="surrogateescape")))
               for i, p in enumerate(paths)]
    entries.append(manifest.Entry("zero", 0, 0, 0, sha(b"")))
    lines = list(manifest.dump_lines("s", entries, {"k": 1}, created=1.5))
    assert lines[1:-1] == [
        (json.dumps([e.path, e.size, e.mtime_ns, e.ino, e.digest]) + "\n").encode()
        for e in entries]
    assert manifest.parse(b"".join(lines), "s").entries == entries


def test_hash_fd_stops_at_the_size_it_is_given(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Given the size an fstat gave, reading stops once that many bytes
    came, without the read that would find the end (the Prehasher checks
    afterwards that the size did not change); without it, at the end."""
    reads: list[int] = []
    real = os.readv

    def counted(fd: int, buffers: Any) -> int:
        reads.append(fd)
        return real(fd, buffers)

    monkeypatch.setattr(manifest.os, "readv", counted)
    data = b"0123456789" * 300_000  # (three reads)
    for size in (0, 10, 2_000_000, len(data), None):
        f = tmp_path / f"f{size}"
        f.write_bytes(data[:size] if size is not None else data)
        fd = os.open(f, os.O_RDONLY)
        try:
            reads.clear()
            assert manifest.hash_fd(fd, size=size) == (sha(f.read_bytes()), len(f.read_bytes()))
        finally:
            os.close(fd)
        assert len(reads) == {0: 0, 10: 1, 2_000_000: 2, len(data): 3, None: 4}[size], size


def test_beneath_open_stat_gives_the_opened_files_stat(tmp_path: Path) -> None:
    """open_stat's stat is the fstat of the fd it opened (what the Prehasher
    keys its result by); a fifo is refused, never opened for reading."""
    root = tmp_path / "t"
    tree(root)
    with manifest.Beneath(root) as beneath:
        fd, st = beneath.open_stat("a/f2")
        try:
            assert (st.st_ino, st.st_size) == (os.fstat(fd).st_ino, 21)
            assert st.st_ino == (root / "a" / "f2").stat().st_ino
        finally:
            os.close(fd)
        with pytest.raises(OSError, match="regular"):
            beneath.open_stat("a/fifo")


def test_prehasher_gives_no_result_for_a_file_that_grows_while_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that changes between the Prehasher's first fstat and the end
    of its read (here: bytes appended) gives no result, so build() reads it."""
    root = tmp_path / "t"
    tree(root)
    real = manifest.hash_fd

    def growing(fd: int, **kw: Any) -> tuple[str, int]:
        with open(root / "a" / "f1", "ab") as f:
            f.write(b"more")
        return real(fd, **kw)

    monkeypatch.setattr(manifest, "hash_fd", growing)
    with manifest.Prehasher(root) as hasher:
        hasher.submit(b"a/f1")
    monkeypatch.undo()
    assert hasher.results == {}
    entries, stats = manifest.build(root, None, prehashed=hasher.results)
    assert stats.prehashed == 0
    assert {e.path: e.digest for e in entries}["a/f1"] == sha((root / "a" / "f1").read_bytes())


def test_itemized_names_are_unescaped() -> None:
    """rsync's `\\#ooo` escapes give back the name's bytes; ">f" lines only."""
    assert manifest.unescape(b"we ird\\#012name") == "we ird\nname"
    assert manifest.unescape(b"odd-\\#377") == os.fsdecode(b"odd-\xff")
    assert manifest.unescape(b"plain\\#x") == "plain\\#x"
    claim = b"0123456789abcdef" * 2
    assert rsync.item(b">f+++++++++ 12 " + claim + b"|a/b c|d") == (
        b">f+++++++++", claim, b"a/b c|d")
    assert rsync.item(b"cd+++++++++ 0 " + b" " * 32 + b"|  a/") == (b"cd+++++++++", b"", b"  a/")
    # another checksum's length claims nothing
    assert rsync.item(b">f+++++++++ 12 0123456789abcdef|x") == (b">f+++++++++", b"", b"x")
    for other in (b"   1,234  50%  1.00MB/s    0:00:01", b">f+++++++++ 12 a/b c",
                  b">f+++++++++ x " + claim + b"|n", b">f+++++++++ 1 " + claim + b"|"):
        assert rsync.item(other) is None


def test_rsync_itemizes_what_it_wrote_in_the_pull_format(tmp_path: Path) -> None:
    """The pull's --out-format makes rsync print one ">f" line per file it
    received, and none for a file it hard-linked from --link-dest."""
    src, old, new = tmp_path / "src", tmp_path / "old", tmp_path / "new"
    tree(src)
    subprocess.run(["rsync", "-aH", f"{src}/", f"{old}/"], check=True)
    (src / "a" / "f1").write_bytes(b"changed")
    out = subprocess.run(["rsync", "-aH", "--modify-window=-1", f"--link-dest={old}",
                          f"--out-format={rsync.ITEM_FORMAT}", f"{src}/", f"{new}/"],
                         capture_output=True, check=True).stdout
    items = rsync.Items()
    for line in out.splitlines():
        items.add(line)
    assert items.wrote == [b"a/f1"]
    assert items.claims == {b"a/f1": xxhash.xxh3_128(b"changed").hexdigest().encode()}


def snapshot_storage(tmp_path: Path, files: int) -> tuple[Storage, Path]:
    storage = Storage(tmp_path / "storage")
    (tmp_path / "storage").mkdir()
    storage.prepare()
    snap = "n.2026-01-01.1767225600"
    tree(storage.root / snap, files)
    entries, _ = manifest.build(storage.root / snap, None)
    manifest.write(manifest.path_of(storage, snap), snap, entries)
    return storage, storage.root / snap


def test_share_rotation_reads_least_recently_verified_first(tmp_path: Path) -> None:
    """`share` 0.25 reads ceil(25%) of the 15 inodes a run, least recently
    verified (never verified first): every run reads only inodes no more
    recently verified than any it leaves, four runs cover all 15, and the
    never-verified count falls to 0."""
    storage, _ = snapshot_storage(tmp_path, files=13)  # 13 + deep + odd = 15 inodes
    state = storage.state / "verified" / "n.json"
    keys = {verify.file_key(e, "", False) for e in manifest.load(storage, next(
        s.dirname for s in storage.snapshots("n"))).entries}  # type: ignore[union-attr]
    assert len(keys) == 15
    before: dict[str, float] = {}
    never = []
    for run in range(6):
        now = 1000.0 + run
        report = verify.run(storage, share=0.25, now=now)
        assert report.files == 15 and report.checked == 4 and report.good == 4
        never.append(report.never_verified)
        after = json.loads(state.read_text())["inodes"]
        read = {k for k, t in after.items() if t == now}
        assert len(read) == 4
        left = keys - read
        assert max(before.get(k, 0.0) for k in read) <= min(before.get(k, 0.0) for k in left)
        before = after
    assert never == [11, 7, 3, 0, 0, 0]
    assert set(before) == keys


def test_verify_records_damage_and_a_good_read_clears_it(tmp_path: Path) -> None:
    """A rotted byte: a damage record naming the snapshot and both paths of the
    inode; once the bytes are good again, the next full run drops it."""
    storage, snap = snapshot_storage(tmp_path, files=3)
    victim = snap / "a" / "b" / "deep"
    st = victim.stat()
    victim.write_bytes(b"DEEP\n")
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    report = verify.run(storage)
    assert report.damage_found and len(report.bad) == 1
    (rec,) = damage.read(storage, "n")
    assert rec["where"] == {snap.name: ["a/b/deep", "linked"]} or \
        sorted(rec["where"][snap.name]) == ["a/b/deep", "linked"]
    assert damage.damaged_snapshots(storage, "n") == {snap.name: 1}
    assert sorted(damage.bad_paths(storage, "n", snap.name)) == ["a/b/deep", "linked"]
    victim.write_bytes(b"deep\n")
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    report = verify.run(storage)
    assert not report.damage_found and damage.read(storage, "n") == []


def test_heal_tree_leaves_out_only_the_bad_paths(tmp_path: Path) -> None:
    """The heal tree reaches every file of the snapshot but the bad ones: a
    hard link for a sibling file, a symlink for a sibling directory."""
    real = tmp_path / "real"
    tree(real)
    (real / "a" / "b" / "other").write_bytes(b"x")
    shadow = tmp_path / "shadow"
    damage.build_heal_tree(real, shadow, ["a/b/deep"])
    assert not (shadow / "a" / "b" / "deep").exists()
    assert (shadow / "a" / "b" / "other").stat().st_ino == (real / "a" / "b" / "other").stat().st_ino
    assert (shadow / "linked").stat().st_ino == (real / "linked").stat().st_ino
    assert (shadow / "a" / "f1").stat().st_ino == (real / "a" / "f1").stat().st_ino
    assert os.readlink(shadow / "a" / "sym") == "/etc/passwd"
    assert not (shadow / "a").is_symlink() and not (shadow / "a" / "b").is_symlink()


def test_unlink_beneath_never_follows_a_symlink(tmp_path: Path) -> None:
    """A client symlink on the way to a bad path in the in-progress tree does
    not lead the unlink elsewhere."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "f").write_bytes(b"keep")
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(elsewhere, dest / "a")
    ino = (elsewhere / "f").stat().st_ino
    assert damage.unlink_beneath(dest, "a/f", {ino}) is False
    assert (elsewhere / "f").read_bytes() == b"keep"
    (dest / "b").mkdir()
    os.link(elsewhere / "f", dest / "b" / "f")
    assert damage.unlink_beneath(dest, "b/f", {ino}) is True
    assert not (dest / "b" / "f").exists()


def test_verify_pull_refuses_a_file_the_disk_gives_back_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `verify_pull`, every file read is read again from the disk; a
    clean tree passes (each re-read counted), and a file whose second read
    differs is removed from the in-progress tree (a retry pulls it again)
    and no manifest is written: a retried TransferInterrupted."""
    from bakgrab.tasks.errors import TransferInterrupted

    storage = Storage(tmp_path / "storage")
    (tmp_path / "storage").mkdir()
    storage.prepare()
    tree(storage.inprogress("n"))
    stats = manifest.make(storage, storage.inprogress("n"), "n.2026-01-01.1", None, reread=True)
    assert stats.reread == stats.hashed == 7 and stats.reread_bad == []
    real = manifest.reread_from_disk
    monkeypatch.setattr(manifest, "reread_from_disk",
                        lambda root, s, *rest: "sha256:" + "0" * 64 if s.path == "a/f2"
                        else real(root, s, *rest))
    with pytest.raises(TransferInterrupted, match="differ"):
        manifest.make(storage, storage.inprogress("n"), "n.2026-01-01.2", None, reread=True)
    assert not (storage.inprogress("n") / "a" / "f2").exists()
    assert (storage.inprogress("n") / "a" / "f1").exists()
    assert not manifest.path_of(storage, "n.2026-01-01.2").exists()


def test_prehasher_results_are_taken_only_for_the_same_inode_size_and_mtime(
    tmp_path: Path
) -> None:
    """Files fed to the Prehasher are hashed on its thread; build() takes
    those results instead of reading again, except for a file changed since
    (its mtime moved), which it reads anew."""
    root = tmp_path / "t"
    tree(root)
    with manifest.Prehasher(root) as hasher:
        for name in (b"a/f0", b"a/f1", b"a/b/deep", b"odd-\\#377-name", b"missing"):
            hasher.submit(name)
    assert len(hasher.results) == 4
    (root / "a" / "f1").write_bytes(b"changed after")
    entries, stats = manifest.build(root, None, prehashed=hasher.results)
    assert stats.prehashed == 3 and stats.hashed == 4  # f1 again; f2, f3, f4
    by_path = {e.path: e.digest for e in entries}
    assert by_path["a/f1"] == sha(b"changed after")
    assert by_path[os.fsdecode(b"odd-\xff-name")] == sha(b"odd")


def test_prehasher_during_a_real_rsync(tmp_path: Path) -> None:
    """Names fed from rsync's real ">f" lines while it runs: whatever the
    race with rsync's rename left to the Prehasher and what build() read
    after, every file is in the manifest once with the hash of its bytes."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    tree(src)
    with manifest.Prehasher(dest) as hasher:
        proc = subprocess.Popen(["rsync", "-aH", f"--out-format={rsync.ITEM_FORMAT}",
                                 f"{src}/", f"{dest}/"], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        items = rsync.Items()
        for line in proc.stdout:
            told = items.add(line.rstrip(b"\n"))
            if told is not None:
                hasher.submit(told[0])
        assert proc.wait(30) == 0
    entries, stats = manifest.build(dest, None, prehashed=hasher.results)
    assert stats.prehashed + stats.hashed == 7
    assert {e.path: e.digest for e in entries} == {
        e.path: sha((dest / e.path).read_bytes()) for e in entries}


def test_beneath_refuses_a_symlink_on_the_way(tmp_path: Path) -> None:
    """A symlink where a directory was never leads a read elsewhere."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "f").write_bytes(b"secret")
    (tmp_path / "t").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "t" / "d")
    with manifest.Beneath(tmp_path / "t") as tree, pytest.raises(OSError):
        tree.open("d/f")


def test_a_damaged_previous_manifest_means_reading_everything(tmp_path: Path) -> None:
    """When the previous snapshot's manifest is damaged, nothing is taken from
    it: every file of the new tree is read."""
    storage, snap = snapshot_storage(tmp_path, files=3)
    path = manifest.path_of(storage, snap.name)
    path.write_bytes(path.read_bytes().replace(b"deep", b"DEEP", 1))
    new = storage.inprogress("n")
    subprocess.run(["cp", "-al", f"{snap}/.", f"{new}/"], check=True)
    stats = manifest.make(storage, new, "n.2026-01-02.1767312000", snap.name)
    assert stats.reused == 0 and stats.hashed == 5


def test_verify_tells_removed_replaced_and_unreadable_apart(tmp_path: Path) -> None:
    """A file whose snapshot cleanup removed meanwhile is skipped ("gone"),
    one replaced by another inode is "missing", a good one passes."""
    storage, snap = snapshot_storage(tmp_path, files=3)
    found = manifest.load(storage, snap.name)
    assert found is not None
    by_path = {e.path: e for e in found.entries}

    def candidate(path: str, snapshot: str = snap.name) -> verify.Candidate:
        e = by_path[path]
        return verify.Candidate("n", "k", e.ino, e.digest, e.size, snapshot, 0, e.path, 0.0)

    with manifest.Beneath(snap) as tree:
        assert verify.check(storage, candidate("a/f0"), tree) is None
        os.link(snap / "a" / "f1", tmp_path / "keep")  # (its inode number is not reused)
        (snap / "a" / "f1").unlink()
        (snap / "a" / "f1").write_bytes(b"file 1\n" * 2)  # same bytes, another inode
        result = verify.check(storage, candidate("a/f1"), tree)
        assert isinstance(result, dict) and result["kind"] == "missing"
    gone = storage.root / "n.2026-01-09.1767916800"
    with manifest.Beneath(gone) as tree:
        assert verify.check(storage, candidate("a/f0", gone.name), tree) == "gone"


def test_a_second_verify_at_once_exits_7(tmp_path: Path) -> None:
    """One verify at a time per storage: a second one is refused with exit 7
    (name busy) and writes nothing."""
    from bakgrab.worker import locks
    from tests import support

    storage, _ = snapshot_storage(tmp_path, files=1)
    with locks.held(storage.internal_lock("verify")):
        done = subprocess.run([support.BAKGRAB, "verify", "--storage", str(storage.root)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 7, done.stderr
    assert "verify" in done.stderr
    assert not (storage.state / "verified" / "n.json").exists()


def test_verify_runs_at_idle_io_priority() -> None:
    """The verify process puts itself in the idle I/O class (what `ionice -c3`
    sets) and lowers its CPU priority; ionice reads it back from the kernel."""
    import sys

    code = ("import os, subprocess; from bakgrab.worker import verify; "
            "assert verify.idle_priority(); "
            "print(subprocess.run(['ionice', '-p', str(os.getpid())], capture_output=True, "
            "text=True, check=True).stdout.strip(), os.nice(0))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    klass, nice = done.stdout.split()
    assert klass == "idle"
    assert int(nice) >= 10


def test_a_stopped_verify_keeps_what_it_had_read(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The verify state is written every CHECKPOINT seconds of a run: a run
    stopped midway (a time limit, Ctrl-C) has recorded the files it read, so
    the next one goes on with the others."""
    storage, _ = snapshot_storage(tmp_path, files=3)
    ticks = iter(range(0, 10_000, 100))
    real = verify.check
    calls = []

    def stopping(*args: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(verify, "check", stopping)
    with pytest.raises(KeyboardInterrupt):
        verify.run(storage, clock=lambda: float(next(ticks)))
    state = json.loads((storage.state / "verified" / "n.json").read_text())
    assert len(state["inodes"]) == 2
    monkeypatch.setattr(verify, "check", real)
    report = verify.run(storage, share=0.6)  # ceil(60% of 5) = 3: the 3 never read
    assert report.checked == 3 and report.never_verified == 0


# -- rsync's own checksums (issue 19) -------------------------------------------

def pull(src: Path, dest: Path, *extra: str) -> rsync.Items:
    """A real local rsync in the pull's format and locale; what its lines said."""
    out = subprocess.run(["rsync", "-aH", "--modify-window=-1", *extra,
                          f"--out-format={rsync.ITEM_FORMAT}", f"{src}/", f"{dest}/"],
                         capture_output=True, check=True, env={**os.environ, "LC_ALL": "C"}).stdout
    items = rsync.Items()
    for line in out.splitlines():
        items.add(line)
    return items


def true_digests(root: Path, entries: list[manifest.Entry]) -> dict[str, str]:
    return {e.path: sha((root / e.path).read_bytes()) for e in entries}


def claims_of(items: rsync.Items) -> manifest.Claims:
    return manifest.Claims(items.claims, items.others)


def test_a_first_pull_takes_rsyncs_checksums_unread(tmp_path: Path) -> None:
    """Into an empty tree, every received file's digest is the xxh128 its
    line claimed (one read proves the kind); the hard link ("hf") shares
    its inode's; nothing else is read."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    tree(src)
    items = pull(src, dest)
    assert len(items.claims) == 7 and all(items.claims.values())
    entries, stats = manifest.build(dest, None, items.wrote, claims=claims_of(items))
    assert (stats.claims, stats.claimed, stats.hashed, stats.claims_refused) == ("used", 7, 0, 0)
    assert {e.path: e.digest for e in entries} == true_digests(dest, entries)
    assert len(entries) == 8  # (the hard link: two paths, one inode)


def test_forged_lines_only_make_files_be_read(tmp_path: Path) -> None:
    """Lines the client adds (it can print any) cannot put a wrong digest in:
    a second claim for a received file, a claim for a hard link's other
    name, a claim with a "cf" line (a local copy) beside it, a claim for a
    file --link-dest linked, one for a path that is not there: each such
    inode is read, or keeps its previous entry."""
    src, old, dest = tmp_path / "src", tmp_path / "old", tmp_path / "dest"
    tree(src)
    subprocess.run(["rsync", "-aH", f"{src}/", f"{old}/"], check=True)
    previous = manifest.Manifest("old", manifest.build(old, None)[0])
    (src / "a" / "f1").write_bytes(b"changed")
    (src / "a" / "f4").write_bytes(b"new content of f4")
    (src / "new").write_bytes(b"a new file")
    items = pull(src, dest, f"--link-dest={old}")
    assert set(items.claims) == {b"a/f1", b"a/f4", b"new"}
    wrong = b"f" * 32
    for line in [b">f+++++++++ 3 " + wrong + b"|a/f1",          # a second claim
                 b">f+++++++++ 3 " + wrong + b"|a/f0",          # linked: the previous entry
                 b">f+++++++++ 3 " + wrong + b"|nowhere",
                 b">f+++++++++ 3 " + wrong + b"|linked",        # no line: linked unchanged
                 b">f+++++++++ 3 " + wrong + b"|a",             # a directory
                 b"cf......... 0 " + b" " * 32 + b"|new"]:      # as if copied locally
        items.add(line)
    entries, stats = manifest.build(dest, previous, items.wrote, claims=claims_of(items))
    assert {e.path: e.digest for e in entries} == true_digests(dest, entries)
    assert stats.claims == "used" and stats.claimed == 1  # a/f4 alone
    assert stats.claims_refused == 2  # a/f1 and new
    # read: those two, and what a ">f" line named although linked (a/f0, and
    # linked's inode: on copy-on-write such a file may be rewritten in place)
    assert stats.hashed == 4 and stats.reused == 3


def test_claims_of_another_checksum_are_not_used(tmp_path: Path) -> None:
    """md5 prints as many hex digits as xxh128: the one file read tells,
    and then every file is read."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    tree(src)
    items = pull(src, dest, "--checksum-choice=md5")
    assert len(items.claims) == 7 and all(items.claims.values())
    entries, stats = manifest.build(dest, None, items.wrote, claims=claims_of(items))
    assert stats.claims.startswith("refused") and stats.claimed == 0 and stats.hashed == 7
    assert {e.path: e.digest for e in entries} == true_digests(dest, entries)


def test_prehasher_stops_once_the_first_claim_reads_true(tmp_path: Path) -> None:
    """With ``sample``, the first claimed file is read and, agreeing, the
    rest are not; with md5's claims it goes on reading them all."""
    for extra, trusting in (((), True), (("--checksum-choice=md5",), False)):
        src, dest = tmp_path / f"src{trusting}", tmp_path / f"dest{trusting}"
        tree(src)
        with manifest.Prehasher(dest, sample=True) as hasher:
            for name, claim in pull(src, dest, *extra).claims.items():
                hasher.submit(name, claim)
        assert hasher.trusting is trusting
        assert len(hasher.results) == (1 if trusting else 7)


def test_dropped_lines_keep_nothing_and_claim_nothing(tmp_path: Path) -> None:
    """Past its limit, Items drops lines and says so; the manifest then reads
    every file (none kept from the previous manifest, no claim taken)."""
    items = rsync.Items(limit=10)
    claim = b"0" * 32
    assert items.add(b">f+++++++++ 1 " + claim + b"|12345") == (b"12345", claim)
    assert items.add(b">f+++++++++ 1 " + claim + b"|123456") is None
    assert not items.complete and items.wrote == [b"12345"]
    storage = Storage(tmp_path / "storage")
    (tmp_path / "storage").mkdir()
    storage.prepare()
    src = tmp_path / "src"
    tree(src)
    first = pull(src, storage.inprogress("n"))
    manifest.make(storage, storage.inprogress("n"), "n.2026-01-01.1", None, first.wrote,
                  claims=claims_of(first))
    storage.inprogress("n").rename(storage.root / "n.2026-01-01.1")
    again = pull(src, storage.inprogress("n"), f"--link-dest={storage.root / 'n.2026-01-01.1'}")
    stats = manifest.make(storage, storage.inprogress("n"), "n.2026-01-01.2", "n.2026-01-01.1",
                          again.wrote, claims=claims_of(again), complete=False)
    assert (stats.reused, stats.claimed, stats.hashed) == (0, 0, 7)


def test_a_version_1_manifest_reads_as_sha256_and_verifies(tmp_path: Path) -> None:
    """Manifests written before issue 19 (version 1: SHA-256 hex, unnamed)
    load with named digests, and verify reads their files with SHA-256."""
    storage, snap = snapshot_storage(tmp_path, files=3)
    path = manifest.path_of(storage, snap.name)
    old = []
    for e in manifest.load(storage, snap.name).entries:  # type: ignore[union-attr]
        digest = hashlib.sha256((snap / e.path).read_bytes()).hexdigest()
        old.append(json.dumps([e.path, e.size, e.mtime_ns, e.ino, digest]) + "\n")
    body = json.dumps({"bakgrab_manifest": 1, "snapshot": snap.name, "hash": "sha256",
                       "created": 1.0, "info": {}}) + "\n" + "".join(old)
    trailer = {"end": len(old), "sha256": hashlib.sha256(body.encode()).hexdigest()}
    path.write_text(body + json.dumps(trailer) + "\n")
    loaded = manifest.load(storage, snap.name)
    assert loaded is not None and all(e.digest.startswith("sha256:") for e in loaded.entries)
    report = verify.run(storage)
    assert report.checked == 5 and report.good == 5 and not report.bad  # (inodes)
    (snap / "a" / "f1").write_bytes(b"rot" * 3)
    assert verify.run(storage).bad


def test_claims_find_their_files_whatever_the_names(tmp_path: Path) -> None:
    """rsync escapes what a name holds (a newline, a byte that is not UTF-8,
    a name's own backslash-hash-digits) so that each line names one file:
    every claim of a real pull lands on its own file, none is refused."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    names = [b"a\\#012b", b"x\\#899", b"new\nline", b"odd\xff", b"tab\there", b" lead",
             b"trail ", b"pipe|name", b"end\\#12", b"\\#134#", b"utf8-\xc3\xa9"]
    for i, raw in enumerate(names):
        (src / os.fsdecode(raw)).write_bytes(b"content %d" % i)
    items = pull(src, dest)
    assert len(items.claims) == len(names) and all(items.claims.values())
    entries, stats = manifest.build(dest, None, items.wrote, claims=claims_of(items))
    assert (stats.claims, stats.claimed, stats.claims_refused) == ("used", len(names), 0)
    assert {e.path: e.digest for e in entries} == true_digests(dest, entries)
    assert sorted(os.fsencode(e.path) for e in entries) == sorted(names)
