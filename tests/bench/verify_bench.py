"""Benchmark of checked snapshots (issue 15):
``python -m tests.bench.verify_bench [--files N] [--seed S] [--out DIR]``.

Real grabs (redis-server, ``bakgrab worker``, the client's one-shot sshd,
rsync over ssh, all on loopback) of the benchmark's deterministic tree
(:mod:`tests.bench.data`):

1. the manifest's cost on the first full backup and on the incremental
   after 1% of the files changed (0.1% added, 0.1% deleted): the seconds
   the worker spent building it after the pull (its own clock, in the
   snapshot's metadata: on the grab's critical path) against the grab's
   wall time without them (goal: at most 10% more); beside it the CPU
   seconds of hashing during the pull (the Prehasher's thread, overlapped
   with rsync: an upper bound of what it adds where CPUs are short);
2. ``bakgrab verify`` of the full snapshot against ``sha256sum`` over the
   same files (one path per inode), both from a warm page cache, so what is
   compared is the reading and hashing, not the disk (goal: at least 0.8x).

Writes ``verify.json`` and ``verify.md`` into ``--out`` (default
``bench-results/``). Everything it starts is stopped by pid, its temp dir
removed, also on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests import support  # noqa: E402
from tests.bench import data  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def grab(broker: str, storage: Path, src: Path) -> dict[str, Any]:
    started = time.monotonic()
    done = support.run_backup(broker, "bench", src, "--json", timeout=3600)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"backup failed: {done.stderr[-2000:]}")
    snapshot = json.loads(done.stdout)["snapshot"]
    meta = json.loads((storage / ".bakgrab" / "meta" / f"{snapshot}.json").read_text())
    built = meta["manifest"]
    return {"snapshot": snapshot, "wall_seconds": round(wall, 3),
            "grab_seconds": meta["result"]["duration"], "manifest": built,
            "manifest_share": round(built["seconds"] / max(wall - built["seconds"], 1e-9), 4)}


def throughput(storage: Path, snapshot: str) -> dict[str, Any]:
    from bakgrab.worker import manifest
    from bakgrab.worker.storage import Storage

    found = manifest.load(Storage(storage), snapshot)
    assert found is not None
    entries = list(found.by_ino().values())
    total = sum(e.size for e in entries)
    root = storage / snapshot
    listing = b"".join(os.fsencode(e.path) + b"\0" for e in entries)
    sha = ["xargs", "-0", "sha256sum"]

    def run_sha256sum() -> float:
        t = time.monotonic()
        subprocess.run(sha, input=listing, cwd=root, stdout=subprocess.DEVNULL, check=True)
        return time.monotonic() - t

    def run_verify() -> float:
        (storage / ".bakgrab" / "verified" / "bench.json").unlink(missing_ok=True)
        t = time.monotonic()
        done = subprocess.run([support.BAKGRAB, "verify", "--storage", str(storage),
                               "--snapshot", snapshot, "--json"], capture_output=True, text=True)
        took = time.monotonic() - t
        report = json.loads(done.stdout)
        if done.returncode != 0 or report["checked"] != len(entries):
            raise RuntimeError(f"verify: {done.returncode} {done.stdout[-500:]}")
        return took

    run_sha256sum()  # warm the page cache for both
    sha_s = min(run_sha256sum() for _ in range(3))
    ver_s = min(run_verify() for _ in range(3))
    return {"files": len(entries), "bytes": total,
            "sha256sum_seconds": round(sha_s, 3), "verify_seconds": round(ver_s, 3),
            "sha256sum_mb_s": round(total / sha_s / 1e6, 1),
            "verify_mb_s": round(total / ver_s / 1e6, 1),
            "ratio": round(sha_s / ver_s, 3)}


def markdown(res: dict[str, Any]) -> str:
    f, i, t = res["full"], res["incremental"], res["verify"]
    rows = [
        "| measure | value | goal |", "| --- | --- | --- |",
        f"| first full backup: manifest seconds after the pull / wall seconds without "
        f"them | {f['manifest']['seconds']} / {f['wall_seconds'] - f['manifest']['seconds']:.2f}"
        f" = {100 * f['manifest_share']:.1f}% (and {f['manifest'].get('prehash_cpu_seconds')} "
        f"CPU s hashing {f['manifest']['prehashed']} files during the pull) | ≤ 10% |",
        f"| 1%-changed incremental: same | {i['manifest']['seconds']} / "
        f"{i['wall_seconds'] - i['manifest']['seconds']:.2f} = {100 * i['manifest_share']:.1f}% "
        f"(read {i['manifest']['hashed'] + i['manifest']['prehashed']} of "
        f"{i['manifest']['inodes']} inodes) | ≤ 10% |",
        f"| verify vs sha256sum, {t['files']} files, {t['bytes'] / 1e6:.0f} MB, warm cache | "
        f"{t['verify_mb_s']} vs {t['sha256sum_mb_s']} MB/s = {t['ratio']}x | ≥ 0.8x |",
    ]
    return "\n".join([f"# bakgrab verify benchmark ({res['files']} files, seed {res['seed']})",
                      "", *rows, ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "bench-results")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bakgrab-verify-bench-"))
    redis = worker = None
    try:
        spec = data.TreeSpec(files=args.files, seed=args.seed)
        src, storage = tmp / "src", tmp / "storage"
        data.generate(src, spec)
        redis, broker = support.start_redis(tmp / "redis")
        worker = support.start_worker(storage, broker, tmp / "worker.log")
        full = grab(broker, storage, src)
        data.mutate(src, spec, 1)
        incremental = grab(broker, storage, src)
        res = {"files": args.files, "seed": args.seed, "full": full,
               "incremental": incremental, "verify": throughput(storage, full["snapshot"])}
    finally:
        if worker is not None:
            worker.stop()
        if redis is not None:
            redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "verify.json").write_text(json.dumps(res, indent=2))
    (args.out / "verify.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
