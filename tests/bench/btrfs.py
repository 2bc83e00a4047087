"""Benchmark of the btrfs backend (issue 14): the main benchmark
(:mod:`tests.bench.run`) with the scenarios and tools that issue asks for in
one run: bakgrab on btrfs, bare rsync with the same snapshot method, bakgrab
on ext4, bare rsync with bakgrab's flags and borg.

    .venv/bin/python -m tests.bench.btrfs [--big] [any option of tests.bench.run]

As root (loop images). Each tool's storage is a sparse loop image of its
own, btrfs or ext4. Scenarios (run.py's numbers), medians of ``--runs``:

1. first full backup;
2. second backup, nothing changed;
3. 1% of the files changed (0.1% added, 0.1% deleted);
4. a 4 KiB change in the middle of the largest file: wall time and the
   space the new backup added (on btrfs ``statvfs``, after a commit);
7. removing the oldest snapshot; and on btrfs the worker's own call
   (:func:`bakgrab.worker.retention.remove_snapshot`) on snapshots of
   2,000 and 20,000 files (and 200,000 with ``--big``): :func:`delete_by_size`.

The results go where run.py writes them (``--out``: results.json and
results.md), with issue 14's goals among the goals.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from tests.bench import tools

GIB = 1 << 30
SCENARIOS = "1,2,3,4,7"
TOOLS = "bakgrab,rsync_auto,bakgrab_btrfs,rsync_btrfs,borg"


def delete_by_size(base: Path, counts: list[int]) -> dict[int, float]:
    """Seconds to remove a read-only snapshot of ``n`` small files on btrfs,
    by the worker's removal (unfreeze, rename to the trash, subvolume delete)."""
    from bakgrab.worker import btrfs, retention
    from bakgrab.worker.storage import Storage, snapshot_dirname

    out = {}
    fs = tools.LoopStorage(base / "btrfs-deletes.img", base / "btrfs-deletes", 8 * GIB, "btrfs")
    try:
        mnt = fs.mountpoint
        store = Storage(mnt / "storage")
        (mnt / "storage").mkdir()
        store.prepare()
        for n in counts:
            tree = mnt / f"tree{n}"
            btrfs.create(tree)
            for d in range(max(1, n // 100)):
                (tree / f"d{d}").mkdir()
                for i in range(min(100, n - d * 100)):
                    (tree / f"d{d}" / f"f{i}").write_bytes(b"x" * 100)
            name = snapshot_dirname("bench", 1_700_000_000 + n)
            btrfs.snapshot(tree, store.root / name, readonly=True)
            btrfs.sync(mnt)
            t0 = time.monotonic()
            retention.remove_snapshot(store, store.snapshots("bench")[0])
            out[n] = time.monotonic() - t0
            btrfs.delete(tree)
    finally:
        fs.close()
        with contextlib.suppress(OSError):
            fs.mountpoint.rmdir()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.btrfs",
                                 description=__doc__.split("\n\n")[0],
                                 epilog="Every other option goes to tests.bench.run.")
    ap.add_argument("--big", action="store_true", help="also remove a 200,000-file snapshot")
    ours, rest = ap.parse_known_args(argv)
    from tests.bench import run

    sizes = "2000,20000" + (",200000" if ours.big else "")
    # run.py's options: later ones win, so the caller's override these
    return run.main(["--scenarios", SCENARIOS, "--tools", TOOLS, "--btrfs-delete-sizes", sizes,
                     *rest])


if __name__ == "__main__":
    sys.exit(main())
