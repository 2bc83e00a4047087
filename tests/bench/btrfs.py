"""Benchmark of the btrfs backend (issue 14): bakgrab on btrfs, bakgrab on
ext4 and borg, on the same generated tree in the same run.

    .venv/bin/python -m tests.bench.btrfs [--files 20000] [--runs 3] [--json OUT]

As root (loop images, a worker per storage). Each storage is its own sparse
loop image, made and removed here. Scenarios, medians of ``--runs``:

1. first full backup;
2. second backup, nothing changed;
3. 1% of the files changed (0.1% added, 0.1% deleted);
4. a 4 KiB change in the middle of the largest file: wall time and the
   space the new snapshot added (statvfs, after a commit);
5. removing the oldest snapshot: the worker's own call
   (:func:`bakgrab.worker.retention.remove_snapshot`), and on btrfs the
   same for snapshots of 2,000 to 200,000 (``--big``) files.

Bare rsync with the snapshot method is not run here (the issue's table
measured it: 0.86 s unchanged); tests/bench/run.py has rsync over ssh.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests import support
from tests.bench import data

GIB = 1 << 30


@contextlib.contextmanager
def loop_fs(base: Path, kind: str, size: int, label: str = "") -> Iterator[Path]:
    """A fresh ``kind`` (btrfs or ext4) filesystem in a sparse loop image."""
    image, mnt = base / f"{label or kind}.img", base / (label or kind)
    with open(image, "wb") as f:
        f.truncate(size)
    mkfs = ["mkfs.btrfs", "-q"] if kind == "btrfs" else ["mkfs.ext4", "-q", "-F"]
    subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
    mnt.mkdir()
    opts = "loop,user_subvol_rm_allowed" if kind == "btrfs" else "loop"
    subprocess.run(["mount", "-o", opts, str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        image.unlink(missing_ok=True)


def used(path: Path) -> int:
    """Used bytes of the filesystem once everything is on disk."""
    from bakgrab.worker import btrfs

    if btrfs.on_btrfs(path):
        btrfs.settle(path)
    else:
        os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class Bakgrab:
    """One redis-server and one ``bakgrab worker`` on one storage."""

    def __init__(self, work: Path, storage: Path, label: str) -> None:
        self.label, self.storage = label, storage
        self.redis, self.url = support.start_redis(work / f"redis-{label}")
        self.worker = support.start_worker(storage, self.url, work / f"worker-{label}.log",
                                           env=support.worker_env())
        self.env = {**os.environ, "XDG_STATE_HOME": str(work / f"state-{label}"),
                    "BAKGRAB_CONFIG": os.devnull}

    def backup(self, src: Path) -> dict[str, Any]:
        t0 = time.monotonic()
        done = support.run_backup(self.url, "bench", src, "--json", env=self.env, timeout=1800)
        wall = time.monotonic() - t0
        if done.returncode != 0:
            raise RuntimeError(f"{self.label}: backup failed: {done.stderr}")
        result = json.loads(done.stdout)
        return {"wall": wall, "worker": result["duration"], "snapshot": result["snapshot"]}

    def stop(self) -> None:
        self.worker.stop()
        self.redis.stop()


class Borg:
    def __init__(self, work: Path, storage: Path) -> None:
        self.repo, self.n = storage / "repo", 0
        self.env = {**os.environ, "BORG_BASE_DIR": str(work / "borg-base"),
                    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes"}
        subprocess.run(["borg", "init", "--encryption=none", str(self.repo)], env=self.env,
                       check=True, capture_output=True)

    def backup(self, src: Path) -> dict[str, Any]:
        self.n += 1
        t0 = time.monotonic()
        subprocess.run(["borg", "create", "--compression", "lz4", f"{self.repo}::a{self.n}",
                        "."], cwd=src, env=self.env, check=True, capture_output=True)
        return {"wall": time.monotonic() - t0}


def remove_oldest(storage: Path) -> float:
    """Seconds the worker's own removal of the oldest snapshot takes."""
    from bakgrab.worker import retention
    from bakgrab.worker.storage import Storage

    store = Storage(storage)
    oldest = store.snapshots("bench")[0]
    t0 = time.monotonic()
    retention.remove_snapshot(store, oldest)
    return time.monotonic() - t0


def delete_by_size(base: Path, counts: list[int]) -> dict[int, float]:
    """Seconds to remove a read-only snapshot of ``n`` small files on btrfs,
    by the worker's removal (unfreeze, rename to the trash, subvolume delete)."""
    from bakgrab.worker import btrfs, retention
    from bakgrab.worker.storage import Storage, snapshot_dirname

    out = {}
    with loop_fs(base, "btrfs", 8 * GIB, "btrfs-deletes") as mnt:
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
    return out


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--big", action="store_true", help="also delete a 200,000-file snapshot")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (worker logs)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: run as root (loop images)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bakgrab-bench-btrfs-"))
    os.chmod(work, 0o755)  # noqa: S103 -- the tree must be readable like any tree
    spec = data.TreeSpec(files=args.files)
    results: dict[str, Any] = {"files": args.files, "runs": args.runs}
    try:
        tree = data.generate(work / "tree", spec)
        results["tree_bytes"] = tree["bytes"]
        with contextlib.ExitStack() as stack:
            size = max(4 * GIB, 4 * tree["bytes"] + GIB)
            mounts = {k: stack.enter_context(loop_fs(work, "ext4" if k == "borgfs" else k,
                                                     size, k))
                      for k in ("btrfs", "ext4", "borgfs")}
            tools: dict[str, Any] = {}
            for kind in ("btrfs", "ext4"):
                tools[f"bakgrab-{kind}"] = Bakgrab(work, mounts[kind] / "storage", kind)
                stack.callback(tools[f"bakgrab-{kind}"].stop)
            tools["borg"] = Borg(work, mounts["borgfs"])
            src = work / "tree"
            scen: dict[str, dict[str, Any]] = {}

            def each(sid: str, prepare: Callable[[int], None] | None = None) -> None:
                scen[sid] = {}
                rows: dict[str, list[dict[str, Any]]] = {k: [] for k in tools}
                for r in range(args.runs if sid != "1" else 1):
                    if prepare is not None:
                        prepare(r)
                    for key, tool in tools.items():
                        before = used(mounts[key.removeprefix("bakgrab-")]
                                      if key != "borg" else mounts["borgfs"])
                        row = tool.backup(src)
                        row["added"] = used(mounts[key.removeprefix("bakgrab-")]
                                            if key != "borg" else mounts["borgfs"]) - before
                        rows[key].append(row)
                        time.sleep(1.1)  # one snapshot name per second
                for key, got in rows.items():
                    scen[sid][key] = {k: median([g[k] for g in got])
                                      for k in ("wall", "worker", "added") if k in got[0]}
                print(f"scenario {sid}: {json.dumps(scen[sid])}", file=sys.stderr)

            each("1")
            each("2")
            each("3", lambda r: data.mutate(src, spec, r) and None)
            each("4", lambda r: data.change_large(src, spec, r) and None)
            scen["5"] = {f"bakgrab-{k}": {"remove_oldest": round(remove_oldest(
                mounts[k] / "storage"), 3)} for k in ("btrfs", "ext4")}
            results["scenarios"] = scen
        counts = [2_000, 20_000] + ([200_000] if args.big else [])
        results["btrfs_delete_by_files"] = {str(n): round(s, 3) for n, s in
                                            delete_by_size(work, counts).items()}
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
