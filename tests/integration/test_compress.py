"""The compress setting end to end (issue 19): real redis-server, ``bakgrab
worker``, the client's one-shot sshd, its gate and rrsync -ro, ssh and rsync.

Each backup's rsync argv is read from the worker's debug log (bakgrab's
process gateway logs every program it starts as ``run: ...``); the bytes on
the wire from rsync's own statistics; the snapshot is compared with its
source by ``rsync -naHAX --checksum``; the choice from the snapshot's
metadata and the grab's result.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests import support

pytestmark = pytest.mark.integration

RUN_RE = re.compile(r"run: \S*rsync (?P<args>.*?) --rsh=")
"""The worker's debug line of the pull's rsync, up to its ssh command."""


def build_tree(src: Path) -> None:
    """Compressible text (a few MiB), incompressible bytes, a hard link and a
    symlink: what compression may change on the wire but never on disk."""
    (src / "text").mkdir(parents=True)
    line = b"the quick brown fox jumps over the lazy dog, again and again\n"
    for i in range(8):
        (src / "text" / f"log{i}.txt").write_bytes(line * (8000 + i))
    (src / "random.bin").write_bytes(os.urandom(256 << 10))
    (src / "photo.jpg").write_bytes(os.urandom(64 << 10))  # in --skip-compress
    os.link(src / "text" / "log0.txt", src / "text" / "hardlink.txt")
    os.symlink("text/log1.txt", src / "link")


def backup(tmp_path: Path, setting: str | None, name: str) -> tuple[dict[str, Any], str,
                                                                   dict[str, Any], Path]:
    """One real backup of a fresh tree with ``setting`` (None: the default);
    the result, the pull's rsync arguments, the snapshot's metadata and the
    source."""
    redis_proc, url = support.start_redis(tmp_path / "redis")
    storage = tmp_path / "storage"
    args = ["--loglevel", "DEBUG"] + (["--compress", setting] if setting else [])
    worker = None
    try:
        worker = support.start_worker(storage, url, tmp_path / "worker.log", *args)
        src = tmp_path / "src"
        build_tree(src)
        done = support.run_backup(url, name, src, "--json", timeout=120)
        assert done.returncode == 0, done.stderr + worker.text()[-3000:]
        result = json.loads(done.stdout)
        assert worker.alive()
        log = worker.text()
    finally:
        if worker is not None:
            worker.stop()
        redis_proc.stop()
    runs = [m.group("args") for m in RUN_RE.finditer(log)]
    assert len(runs) == 1, runs  # one pull: no fallback, no retry
    [snap] = support.snapshots(storage, name)
    meta = json.loads((storage / ".bakgrab" / "meta" / f"{snap.name}.json").read_text())
    assert support.rsync_diff(src, snap) == []
    return result, runs[0], meta, src


def unique_bytes(src: Path) -> int:
    """The bytes of the tree's regular files, each inode once (a hard link
    crosses the wire as a name only)."""
    seen = {(p.lstat().st_ino): p.lstat().st_size for p in src.rglob("*")
            if p.is_file() and not p.is_symlink()}
    return sum(seen.values())


def compress_words(args: str) -> list[str]:
    return [w for w in args.split() if w == "-z" or w.startswith("--compress")
            or (w.startswith("-") and not w.startswith("--") and "z" in w)]


def test_off_sends_no_z_and_the_snapshot_is_identical(tmp_path: Path) -> None:
    """``--compress off``: the rsync the worker starts has no -z at all, the
    bytes on the wire are no fewer than the files' (nothing was compressed),
    and the snapshot equals its source."""
    result, args, meta, src = backup(tmp_path, "off", "plain")
    assert args.startswith("-HaAX --sparse"), args
    assert compress_words(args) == []
    assert "--skip-compress=" in args
    assert result["bytes_transferred"] >= unique_bytes(src) > 4 << 20
    assert meta["compress"]["setting"] == "off" and meta["compress"]["used"] == "off"
    assert result["compress"]["used"] == "off"


def test_zstd_1_passes_rrsync_and_compresses(tmp_path: Path) -> None:
    """``--compress zstd:1``: the worker's rsync asks for zstd level 1; the
    client's gate and rrsync -ro let it through (the pull succeeds in one
    run), the text crosses the wire compressed, and the snapshot is identical."""
    result, args, meta, _ = backup(tmp_path, "zstd:1", "zstd")
    assert compress_words(args) == ["-z", "--compress-choice=zstd", "--compress-level=1"]
    assert "--skip-compress=" in args
    # ~4 MiB of repeated text and 320 KiB of random bytes: far fewer bytes sent
    assert result["bytes_transferred"] < result["total_size"] / 4, result
    assert meta["compress"]["used"] == "zstd:1"
    assert meta["compress"]["why"] == "set by the operator"
    assert "fallback" not in meta["compress"]


def test_auto_on_loopback_chooses_off_and_says_why(tmp_path: Path) -> None:
    """The default, ``auto``: for a client on this host (loopback) it sends no
    -z, and records the choice and its reason in the snapshot's metadata and
    the grab's result."""
    result, args, meta, _ = backup(tmp_path, None, "auto")
    assert compress_words(args) == []
    chosen = meta["compress"]
    assert chosen["setting"] == "auto" and chosen["used"] == "off"
    assert "loopback" in chosen["why"]
    assert chosen["measured"]["link"] == "loopback"
    assert chosen["measured"]["cpus"] == os.cpu_count()
    assert result["compress"] == chosen
