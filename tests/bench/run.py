"""The benchmark: ``python -m tests.bench.run [--quick] [--files N] [--seed S] [--out DIR]``.

Generates a deterministic tree, starts its own redis-server, ``bakgrab
worker`` and sshd on free loopback ports, runs every tool through every
scenario (each measured as the median of several runs), and writes
``results.json`` and ``results.md`` into ``--out`` (default
``bench-results/`` at the repo root). Everything it starts is stopped by pid
and its temp dir removed, also on errors and Ctrl-C.

Scenarios:
1. first full backup; 2. second backup, nothing changed; 3. 1% of the
files changed, 0.1% added, 0.1% deleted; 4. one large file with a small
change in the middle; 5. an empty tree (the fixed cost of one job);
6. 8 clients with 1/8 of the tree each, at once and one after another;
7. removing one snapshot of the full tree; 8. a first backup over a 20
Mbit/s link (a network namespace, tc's token bucket; root only), where
compression should win (issue 19): bakgrab with compress = auto against bare
rsync -z, with auto's choice, and without compression.

With btrfs (as root, ``mkfs.btrfs`` installed; issue 14), two more tools run
every scenario but 8, each on a btrfs loop image of its own: bakgrab with
its storage on btrfs, and bare rsync with the btrfs backend's snapshot
method (``tools.SnapshotRsync``); scenario 7 then also removes snapshots of
2,000 and more files on btrfs by the worker's own call
(``tests/bench/btrfs.py``). After scenario 4 every tool's newest tree is
compared with the source (``rsync -n --checksum``): a tool that wrote a
wrong tree fails the run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: tests/bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench import data, procs, report, tools  # noqa: E402
from tests.bench.link import SlowLink  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

SCENARIOS = {
    "1": "first full backup",
    "2": "second backup, nothing changed",
    "3": "1% of files changed, 0.1% added, 0.1% deleted",
    "4": "one large file, small change in the middle",
    "5": "empty tree (fixed cost of one job)",
    "6": "8 clients with 1/8 of the tree each: at once vs one after another",
    "7": "removing one snapshot of the full tree",
    "8": "first backup over a 20 Mbit/s link",
}
SLOW = "slow"
LINK_MBIT = 20
MAIN = "main"
EMPTY = "empty"


@dataclasses.dataclass
class Plan:
    mode: str
    spec: data.TreeSpec
    runs: int
    runs6: int
    clients: int
    second6: bool
    storage_fs: str
    out: Path
    workdir: Path | None
    keep: bool
    btrfs: bool = True
    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    tools: tuple[str, ...] = ()
    """Keys of the tools to run; empty: all."""
    delete_sizes: tuple[int, ...] = ()
    """Files of the btrfs snapshots scenario 7 also removes one by one."""


def parse_args(argv: Sequence[str] | None) -> Plan:
    ap = argparse.ArgumentParser(
        prog="python -m tests.bench.run",
        description="Benchmark bakgrab against bare rsync, rsnapshot and borg on this machine.")
    ap.add_argument("--quick", action="store_true",
                    help="2,000 small files (~16 MB), 3 runs per scenario (1 for scenario 6): "
                         "about two minutes on 2 cores")
    ap.add_argument("--files", type=int, help="names in the tree (default 20,000; quick 2,000)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the generated tree (default 1)")
    ap.add_argument("--scale", type=float,
                    help="multiplies the size of every file but the large ones "
                         "(default 1.0; quick 0.25)")
    ap.add_argument("--large-mb", type=float,
                    help="size of the largest file in MiB (default 40; quick 8)")
    ap.add_argument("--hardlinks", action=argparse.BooleanOptionalAction, default=True,
                    help="0.5%% of the names extra hard links (default: on)")
    ap.add_argument("--runs", type=int, help="runs per scenario (default 5; quick 3)")
    ap.add_argument("--runs6", type=int, help="runs of scenario 6 (default 3; quick 1)")
    ap.add_argument("--clients", type=int, default=8, choices=range(1, 9), metavar="1..8",
                    help="clients in scenario 6 (default 8)")
    ap.add_argument("--second6", action=argparse.BooleanOptionalAction, default=None,
                    help="in scenario 6 also time a second backup of every client, nothing "
                         "changed (default: on; off with --quick)")
    ap.add_argument("--storage-fs", choices=("loop", "dir"), default="loop",
                    help="loop (default, as root): each tool's storage is a fresh loop-mounted "
                         "ext4, remade empty before every first backup; dir: plain "
                         "directories in the work dir, emptied with rm -rf")
    ap.add_argument("--btrfs", action=argparse.BooleanOptionalAction, default=True,
                    help="also run bakgrab on btrfs and bare rsync with its snapshot method, "
                         "each on a btrfs loop image (default: on where loop storage and "
                         "mkfs.btrfs are available)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help="which scenarios to run, comma-separated (default: all)")
    ap.add_argument("--tools", default="",
                    help="keys of the tools to run, comma-separated (default: all; e.g. "
                         "bakgrab,bakgrab_btrfs,rsync_btrfs,borg)")
    ap.add_argument("--btrfs-delete-sizes", default=None,
                    help="files of the btrfs snapshots scenario 7 removes by the worker's call "
                         "(default 2000,20000; quick 2000)")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results",
                    help="where results.json and results.md go (default: bench-results/)")
    ap.add_argument("--workdir", type=Path,
                    help="parent of the temp dir holding the tree and every storage "
                         "(default: $TMPDIR or /tmp); it needs about 12x the tree's size")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (for debugging)")
    a = ap.parse_args(argv)
    quick = a.quick
    spec = data.TreeSpec(
        files=a.files if a.files is not None else (2000 if quick else 20_000),
        seed=a.seed,
        scale=a.scale if a.scale is not None else (0.25 if quick else 1.0),
        large_mb=a.large_mb if a.large_mb is not None else (8.0 if quick else 40.0),
        hardlinks=a.hardlinks,
    )
    if spec.files < 100:
        ap.error("--files must be at least 100")
    runs = a.runs if a.runs is not None else (3 if quick else 5)
    runs6 = a.runs6 if a.runs6 is not None else (1 if quick else min(3, runs))
    if runs < 1 or runs6 < 1:
        ap.error("--runs and --runs6 must be at least 1")
    second6 = a.second6 if a.second6 is not None else not quick
    scenarios = tuple(sid for sid in SCENARIOS if sid in a.scenarios.split(","))
    if not scenarios or set(a.scenarios.split(",")) - set(SCENARIOS):
        ap.error(f"--scenarios: a comma-separated choice of {','.join(SCENARIOS)}")
    sizes = a.btrfs_delete_sizes or ("2000" if quick else "2000,20000")
    try:
        delete_sizes = tuple(int(n) for n in sizes.split(",") if n)
    except ValueError:
        ap.error("--btrfs-delete-sizes: numbers of files, comma-separated")
    return Plan("quick" if quick else "full", spec, runs, runs6, a.clients, second6,
                a.storage_fs, a.out, a.workdir, a.keep, btrfs=a.btrfs, scenarios=scenarios,
                tools=tuple(k for k in a.tools.split(",") if k), delete_sizes=delete_sizes)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- measuring ---------------------------------------------------------------------------

class JobFailed(RuntimeError):
    pass


def measure(tool: tools.Tool, jobs: Sequence[tools.Job], *, concurrent: bool = False,
            errdir: Path, memory_of: int | None = None) -> dict[str, Any]:
    """Run ``jobs`` (one after another, or all at once) and measure them:
    wall time, CPU of what we ran (and what it reaped), CPU of the tool's
    long-lived servers, bytes and inodes added to its storage. Dirty pages
    are written out first (untimed), so that no run pays for an earlier one."""
    os.sync()
    bytes0, inodes0 = tool.usage if tool.usage is not None else tool.disk_usage()
    srv0 = procs.tree_cpu(tool.server_pids())
    cpu0 = procs.children_cpu()
    mem_idle = procs.tree_memory(memory_of) if memory_of else None
    sampler = procs.MemorySampler(memory_of) if memory_of else contextlib.nullcontext()
    errs: list[Path] = []
    running: list[tuple[tools.Job, subprocess.Popen[bytes]]] = []
    t0 = time.monotonic()
    try:
        run_jobs(jobs, running, errs, concurrent, errdir, tool.key, sampler)
    finally:
        for _, p in running:
            if p.poll() is None:  # interrupted: stop what we started, by pid
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    wall = time.monotonic() - t0
    tool.settle()
    cpu_local = procs.children_cpu() - cpu0
    cpu_server = procs.tree_cpu(tool.server_pids()) - srv0
    for (job, p), err in zip(running, errs, strict=True):
        if p.returncode not in job.ok_codes:
            raise JobFailed(f"{tool.label}: {tools.shell_join(job.argv)} exited {p.returncode}:\n"
                            f"{err.read_text(errors='replace')[-3000:]}")
    bytes1, inodes1 = tool.usage = tool.disk_usage()
    rec: dict[str, Any] = {
        "wall": wall,
        "cpu": cpu_local + cpu_server,
        "cpu_local": cpu_local,
        "cpu_server": cpu_server,
        "bytes_added": bytes1 - bytes0,
        "inodes_added": inodes1 - inodes0,
        "jobs": [{"wall": job.ended - job.started, "started": job.started, "ended": job.ended,
                  **(job.after(job) if job.after else {})} for job, _ in running],
    }
    if memory_of and isinstance(sampler, procs.MemorySampler):
        rec["memory"] = {"idle": mem_idle, "peak": sampler.peak, "samples": sampler.samples}
    return rec


def run_jobs(jobs: Sequence[tools.Job], running: list[Any], errs: list[Path],
             concurrent: bool, errdir: Path, key: str, sampler: Any) -> None:
    with sampler:
        for i, job in enumerate(jobs):
            err = errdir / f"{key}-{time.monotonic_ns()}-{i}.err"
            errs.append(err)
            with contextlib.ExitStack() as stack:
                out: Any = (stack.enter_context(open(job.stdout, "wb")) if job.stdout
                            else subprocess.DEVNULL)
                e = stack.enter_context(open(err, "wb"))
                job.started = time.time()
                p = subprocess.Popen(job.argv, env=job.env, stdout=out, stderr=e,
                                     stdin=subprocess.DEVNULL)
            running.append((job, p))
            if not concurrent:
                p.wait()
                job.ended = time.time()
        for job, p in running:
            if p.returncode is None:
                p.wait()
                job.ended = time.time()


NUMERIC = ("wall", "cpu", "cpu_local", "cpu_server", "bytes_added", "inodes_added")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    med = {k: statistics.median(r[k] for r in runs) for k in NUMERIC}
    spread = {k: [min(r[k] for r in runs), max(r[k] for r in runs)] for k in ("wall", "cpu")}
    return {"median": med, "min_max": spread, "runs": runs}


def rotated(items: Sequence[tools.Tool], r: int) -> list[tools.Tool]:
    k = r % len(items)
    return list(items[k:]) + list(items[:k])


# -- the scenarios ------------------------------------------------------------------------

class Bench:
    def __init__(self, plan: Plan, work: Path, tool_list: list[tools.Tool],
                 fs: dict[str, tools.LoopStorage] | None) -> None:
        self.plan = plan
        self.fs = fs
        self.work = work
        self.tools = tool_list
        self.tree = work / "tree"
        self.empty = work / "empty"
        self.errdir = work / "stderr"
        self.errdir.mkdir()
        self.results: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        self.link: Any = None
        self.link_tools: list[Any] = []
        self.link_skipped = ""

    def empty_storage(self, tool: tools.Tool, names: Sequence[str]) -> None:
        """Make ``tool``'s storage hold nothing of ``names`` (a fresh filesystem
        when it has one of its own)."""
        if self.fs:
            self.fs[tool.key].fresh(keep=tool.kept_state)
            tool.forget()
        else:
            for n in names:
                tool.wipe(n)
        tool.usage = None

    def m(self, tool: tools.Tool, jobs: Sequence[tools.Job], **kw: Any) -> dict[str, Any]:
        return measure(tool, jobs, errdir=self.errdir, **kw)

    def record(self, sid: str, per_tool: dict[str, list[dict[str, Any]]], **info: Any) -> None:
        self.results[sid] = {
            "title": SCENARIOS[sid], "runs": len(next(iter(per_tool.values()))), **info,
            "tools": {t.key: summarize(per_tool[t.key]) for t in self.tools},
        }
        meds = ", ".join(f"{t.key} {self.results[sid]['tools'][t.key]['median']['wall']:.2f}s"
                         for t in self.tools)
        log(f"scenario {sid}: {meds}")

    def simple(self, sid: str, name: str, source: Path, before_run: Any = None,
               runs: int | None = None) -> None:
        per: dict[str, list[dict[str, Any]]] = {t.key: [] for t in self.tools}
        changes = []
        for r in range(runs or self.plan.runs):
            if before_run is not None:
                changes.append(before_run(r))
            for tool in rotated(self.tools, r):
                if sid == "1":
                    self.empty_storage(tool, [name])
                if tool.prepare(name):
                    tool.usage = None
                per[tool.key].append(self.m(tool, [tool.backup(name, source)]))
        self.record(sid, per, **({"changes": changes} if changes else {}))

    def s1(self) -> None:
        self.simple("1", MAIN, self.tree)

    def s2(self) -> None:
        self.simple("2", MAIN, self.tree)

    def s3(self) -> None:
        self.simple("3", MAIN, self.tree,
                    before_run=lambda r: data.mutate(self.tree, self.plan.spec, r))

    def s4(self) -> None:
        self.simple("4", MAIN, self.tree,
                    before_run=lambda r: data.change_large(self.tree, self.plan.spec, r))

    def s5(self) -> None:
        self.empty.mkdir()
        bg = self.bakgrab()
        offset = bg.worker_log_offset() if bg else 0
        self.simple("5", EMPTY, self.empty)
        if bg:
            self.extra["fixed_cost"] = self.fixed_cost_breakdown(bg, offset)

    def verify(self) -> None:
        """Every tool's newest tree holds the source's, bit for bit and with
        its metadata: ``rsync -n`` with bakgrab's -HaAX, ``--checksum`` and
        ``--delete`` lists no difference (borg keeps no tree)."""
        found: dict[str, list[str]] = {}
        for tool in self.tools:
            tree = tool.newest_tree(MAIN)
            if tree is None:
                continue
            done = subprocess.run(
                ["rsync", "-naHAX", "--checksum", "--delete", "--numeric-ids",
                 "--out-format=%i %n", f"{self.tree}/", f"{tree}/"],
                capture_output=True, text=True, check=True)
            # (the top dir itself: its mode and times are the storage's own)
            found[tool.key] = [line for line in done.stdout.splitlines()
                               if line.strip() and not line.endswith(" ./")]
        self.extra["verify"] = {k: {"differences": len(v), "first": v[:20]}
                                for k, v in found.items()}
        wrong = {k: v[:5] for k, v in found.items() if v}
        log("verify: newest trees " + ", ".join(f"{k} {len(v)} differences"
                                                 for k, v in found.items()))
        if wrong:
            raise RuntimeError(f"newest tree differs from the source: {wrong}")

    def btrfs_deletes(self) -> None:
        """Removing one read-only btrfs snapshot of n small files by the
        worker's own call, for each of the plan's sizes (issue 14: flat)."""
        if not self.plan.delete_sizes or not any(
                isinstance(t, tools.Bakgrab) and t.key.endswith("btrfs") for t in self.tools):
            return
        from tests.bench import btrfs

        took = btrfs.delete_by_size(self.work, list(self.plan.delete_sizes))
        self.extra["btrfs_delete_by_files"] = {str(n): s for n, s in took.items()}
        log("btrfs deletes: " + ", ".join(f"{n} files {s:.3f}s" for n, s in took.items()))

    def s7(self) -> None:
        per: dict[str, list[dict[str, Any]]] = {t.key: [] for t in self.tools}
        for r in range(self.plan.runs):
            for tool in rotated(self.tools, r):
                before = tool.snapshots(MAIN)
                if len(before) < 2:
                    raise RuntimeError(f"{tool.label}: scenario 7 needs 2 snapshots, has "
                                       f"{len(before)}")
                rec = self.m(tool, tool.remove_oldest(MAIN))
                after = tool.snapshots(MAIN)
                if len(after) != len(before) - 1 or before[0] in after:
                    raise RuntimeError(f"{tool.label}: removing the oldest snapshot left "
                                       f"{before} -> {after}")
                per[tool.key].append(rec)
        self.record("7", per)
        self.btrfs_deletes()

    def s6(self) -> None:
        parts = [data.PARTS[i] for i in range(self.plan.clients)]
        names = [f"part-{p}" for p in parts]
        sources = [self.tree / p for p in parts]
        per: dict[str, dict[str, list[dict[str, Any]]]] = {
            t.key: {"concurrent": [], "serial": [], "concurrent_incremental": [],
                    "serial_incremental": []} for t in self.tools}
        for r in range(self.plan.runs6):
            modes = ["concurrent", "serial"] if r % 2 == 0 else ["serial", "concurrent"]
            for tool in rotated(self.tools, r):
                for mode in modes:
                    self.empty_storage(tool, names)
                    for n in names:
                        tool.prepare(n)
                    mem = (tool.worker.pid if isinstance(tool, tools.Bakgrab)
                           and mode == "concurrent" else None)
                    jobs = [tool.backup(n, s) for n, s in zip(names, sources, strict=True)]
                    per[tool.key][mode].append(
                        self.m(tool, jobs, concurrent=mode == "concurrent", memory_of=mem))
                    if self.plan.second6:
                        jobs = [tool.backup(n, s) for n, s in zip(names, sources, strict=True)]
                        per[tool.key][mode + "_incremental"].append(
                            self.m(tool, jobs, concurrent=mode == "concurrent"))
        out: dict[str, Any] = {}
        for t in self.tools:
            entry: dict[str, Any] = {k: summarize(v) if v else None
                                     for k, v in per[t.key].items()}
            for kind in ("", "_incremental"):
                if entry["concurrent" + kind] is None:
                    entry["ratio" + kind] = None
                    continue
                c = entry["concurrent" + kind]["median"]["wall"]
                s = entry["serial" + kind]["median"]["wall"]
                entry["ratio" + kind] = c / s if s else None
            out[t.key] = entry
        bg = per.get("bakgrab", {}).get("concurrent", [])
        if bg:
            def med(part: str, key: str) -> float:
                return statistics.median(r["memory"][part][key] for r in bg)

            idle_pss, peak_pss = med("idle", "pss_kib"), med("peak", "pss_kib")
            self.extra["worker_memory"] = {
                "clients": len(names), "runs": len(bg),
                "idle_pss_kib": idle_pss, "peak_pss_kib": peak_pss,
                "idle_rss_kib": med("idle", "rss_kib"), "peak_rss_kib": med("peak", "rss_kib"),
                "idle_processes": med("idle", "processes"),
                "peak_processes": med("peak", "processes"),
                "per_grab_pss_kib": statistics.median(
                    (r["memory"]["peak"]["pss_kib"] - r["memory"]["idle"]["pss_kib"]) / len(names)
                    for r in bg),
                "note": "PSS of the worker's whole process tree (Celery main, prefork pool, "
                        "their rsync receivers and ssh), sampled every 50 ms during the "
                        "concurrent first backups; per grab = (peak - idle) / clients, the "
                        "median over runs",
            }
        self.results["6"] = {"title": SCENARIOS["6"], "clients": names, "tools": out}
        log("scenario 6: " + ", ".join(
            f"{t.key} at-once/serial {out[t.key]['ratio']:.2f}" for t in self.tools))

    def bakgrab(self) -> tools.Bakgrab | None:
        for t in self.tools:
            if isinstance(t, tools.Bakgrab):
                return t
        return None

    def fixed_cost_breakdown(self, bg: tools.Bakgrab, offset: int) -> dict[str, Any]:
        """Where one empty job's time goes, from the client's start and end and
        the worker's log (received; Celery's task runtime)."""
        runs = self.results["5"]["tools"]["bakgrab"]["runs"]
        tasks = bg.task_times(offset)
        rows = []
        for rec, task in zip(runs, tasks, strict=False):
            job = rec["jobs"][0]
            rows.append({
                "client_start_to_worker_received": task["received"] - job["started"],
                "worker_task_runtime": task["runtime"],
                "grab_duration_reported": job.get("worker_duration"),
                "worker_done_to_client_exit": job["ended"] - (task["received"] + task["runtime"]),
                "client_wall": job["wall"],
            })
        med = ({k: statistics.median(r[k] for r in rows if r[k] is not None) for k in rows[0]}
               if rows else {})
        # Two probes: the client's interpreter start, and one ssh login.
        startup = []
        for _ in range(3):
            w, _, _, _ = procs.run_timed([bg.bin, "--version"], env=bg.client_env)
            startup.append(w)
        return {"median": med, "runs": rows,
                "bakgrab_cli_startup": statistics.median(startup),
                "note": "client_start_to_worker_received: client start-up, keys, one-shot "
                        "sshd, broker connection, send, queue, worker pickup; "
                        "worker_task_runtime: Celery's runtime of the task (validation, "
                        "locks, cleanup, rsync over ssh to the one-shot sshd, publish); "
                        "worker_done_to_client_exit: result delivery and the client's "
                        "teardown. Worker log times have 1 ms resolution."}

    def s8(self) -> None:
        """A first backup over the slow link, each run into an empty storage
        (issue 19). The source is the tree's first top-level dir in full mode
        (1/8 of it; the whole tree would take minutes per run at 20 Mbit/s),
        the whole quick tree in quick mode."""
        if not self.link_tools or self.link is None:
            self.results["8"] = {"title": SCENARIOS["8"], "runs": 0, "tools": {},
                                 "skipped": self.link_skipped}
            log(f"scenario 8 skipped: {self.link_skipped}")
            return
        source = self.tree if self.plan.mode == "quick" else self.tree / data.PARTS[0]
        per: dict[str, list[dict[str, Any]]] = {t.key: [] for t in self.link_tools}
        for r in range(min(self.plan.runs, 3)):
            for tool in rotated(self.link_tools, r):
                tool.wipe(SLOW)
                tool.usage = None
                job = (tool.backup_over(self.link.wrap, SLOW, source)
                       if isinstance(tool, tools.Bakgrab) else tool.backup(SLOW, source))
                per[tool.key].append(self.m(tool, [job]))
        self.results["8"] = {
            "title": SCENARIOS["8"], "runs": len(per[self.link_tools[0].key]),
            "source": str(source.relative_to(self.work)), "link": self.link.describe(),
            "tools": {t.key: summarize(per[t.key]) for t in self.link_tools},
        }
        log("scenario 8: " + ", ".join(
            f"{t.key} {self.results['8']['tools'][t.key]['median']['wall']:.2f}s"
            for t in self.link_tools))

    def run_all(self) -> None:
        for sid, fn in (("1", self.s1), ("2", self.s2), ("3", self.s3), ("4", self.s4),
                        ("7", self.s7), ("5", self.s5), ("6", self.s6), ("8", self.s8)):
            if sid not in self.plan.scenarios:
                continue
            log(f"scenario {sid}: {SCENARIOS[sid]}")
            fn()
            if sid == "4":
                self.verify()


# -- machine, goals, output ------------------------------------------------------------

def machine(work: Path) -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    fs = subprocess.run(["df", "-hT", str(work)], capture_output=True, text=True).stdout
    fs_line = fs.splitlines()[-1].split() if fs else []
    disk = "?"
    if len(fs_line) >= 3:
        disk = f"{fs_line[0]} ({fs_line[1]}, {fs_line[2]})"
        with contextlib.suppress(OSError):
            dev = Path(fs_line[0]).name
            rot = Path(f"/sys/block/{dev}/queue/rotational").read_text().strip()
            disk += ", rotational" if rot == "1" else ", non-rotational"
    os_name = "?"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory": mem, "disk": disk,
            "os": os_name, "kernel": platform.release(), "user": os.geteuid() == 0 and "root"
            or str(os.geteuid())}


def sandbox_cost(work: Path, rounds: int = 30) -> dict[str, Any]:
    """What the rsync sandbox adds to a job (issue 11): building the Landlock
    ruleset of a pull plus entering it in the child, as the median wall time
    of starting ``true`` confined minus unconfined."""
    import functools

    from bakgrab.tasks import process
    from bakgrab.worker import sandbox

    dirs = [work / "sandbox-cost" / d for d in ("dest", "link", "run")]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    box = sandbox.Sandbox(write=[dirs[0]], link_from=[dirs[1]], read=[dirs[2]], port=22)

    def once(confined: bool) -> float:
        t = time.perf_counter()
        with contextlib.ExitStack() as stack:
            confine = None
            if confined:
                confine = functools.partial(sandbox.enter, stack.enter_context(box.ruleset()))
            with process.spawn(["true"], confine=confine) as child:
                child.wait(30)
        return time.perf_counter() - t

    plain = statistics.median(once(False) for _ in range(rounds))
    boxed = statistics.median(once(True) for _ in range(rounds))
    return {"abi": sandbox.abi(), "unconfined_s": plain, "confined_s": boxed,
            "cost_ms": max(0.0, boxed - plain) * 1000, "rounds": rounds}


def request_check_cost(work: Path, rounds: int = 50) -> dict[str, Any]:
    """What checking a request costs the worker per job (issue 11): the field
    checks, opening the sealed one-time key, the signature against the name's
    registration and the freshness record, on a real storage dir."""
    import uuid

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from bakgrab.client.keys import one_time_key, public_line
    from bakgrab.tasks import GRAB, sealed
    from bakgrab.tasks.config import Settings
    from bakgrab.tasks.request import GrabRequest, sign, validate
    from bakgrab.worker import names
    from bakgrab.worker.storage import Storage

    (work / "request-cost").mkdir()
    storage = Storage(work / "request-cost").prepare()
    request_key = sealed.load_or_create_private(storage.request_key)
    identity = Ed25519PrivateKey.generate()
    host_key = public_line(identity)
    names.write(storage, "bench", names.parse(host_key + "\n"))
    settings = Settings(storage=str(storage.root))
    took = []
    for _ in range(rounds):
        task_id = str(uuid.uuid4())
        sealed_key = sealed.seal(request_key.public_key(), one_time_key().private.encode())
        wire = sign(GrabRequest(name="bench", address="127.0.0.1", port=22, user="root",
                                key=sealed_key, host_key=host_key,
                                excludes=tuple(f"/x{i}" for i in range(50))).to_wire(),
                    GRAB, task_id, identity)
        t = time.perf_counter()
        request = validate(wire, request_key=request_key)
        names.check_request(storage, settings, GRAB, task_id, request)
        took.append(time.perf_counter() - t)
    return {"median_ms": statistics.median(took) * 1000, "rounds": rounds}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def goals(results: dict[str, Any], extra: dict[str, Any]) -> list[dict[str, Any]]:
    def wall(sid: str, tool: str) -> float | None:
        try:
            return float(results[sid]["tools"][tool]["median"]["wall"])
        except KeyError:
            return None

    def med(sid: str, tool: str, key: str) -> float | None:
        try:
            return float(results[sid]["tools"][tool]["median"][key])
        except KeyError:
            return None

    out = []

    def goal(what: str, value: float | None, limit: float | None, unit: str = "x") -> None:
        met = None if value is None or limit is None else value <= limit
        out.append({"goal": what, "value": value, "limit": limit, "unit": unit, "met": met})

    # issue 19: "bare rsync with the same flags" is the row with the flags
    # bakgrab's compress = auto ran (rsync_auto); plain -z is the original's
    same = "rsync_auto" if "rsync_auto" in results.get("1", {}).get("tools", {}) else "rsync"
    goal("1: bakgrab / bare rsync with the same flags, wall",
         ratio(wall("1", "bakgrab"), wall("1", same)), 1.10)
    goal("1: bakgrab / bare rsync -z (the original flags), wall",
         ratio(wall("1", "bakgrab"), wall("1", "rsync")), None)
    for other in ("borg", "rsnapshot"):
        goal(f"1: bakgrab (compress = auto) / {other}, wall",
             ratio(wall("1", "bakgrab"), wall("1", other)), 1.0)
    for sid in ("2", "3"):
        goal(f"{sid}: bakgrab / bare rsync with the same flags, wall",
             ratio(wall(sid, "bakgrab"), wall(sid, same)), 1.10)
        goal(f"{sid}: bakgrab / rsnapshot, wall",
             ratio(wall(sid, "bakgrab"), wall(sid, "rsnapshot")), 1.0)
    goal("2: bakgrab bytes added / scenario 1's bytes added",
         ratio(med("2", "bakgrab", "bytes_added"), med("1", "bakgrab", "bytes_added")), 0.02,
         unit="fraction")
    goal("5: fixed cost of one job (bakgrab, empty tree), s", wall("5", "bakgrab"), 0.40, "s")
    goal("5: bakgrab / bare rsync -e ssh of the same empty tree, wall",
         ratio(wall("5", "bakgrab"), wall("5", same)), 1.3)
    s6 = results.get("6", {}).get("tools", {}).get("bakgrab", {})
    goal("6: bakgrab 8 at once / one after another, wall (first backups)", s6.get("ratio"), 0.75)
    goal("6: the same, second backups (nothing changed)", s6.get("ratio_incremental"), None)
    box, check = extra.get("sandbox"), extra.get("request_check")
    goal("5: of which the rsync sandbox (Landlock), ms", box["cost_ms"] if box else None, 20.0,
         "ms")
    goal("5: of which the request check (fields, sealed key, signature, record), ms",
         check["median_ms"] if check else None, 20.0, "ms")
    slow = results.get("8", {}).get("tools", {})
    for other in ("rsync_link", "rsync_link_off"):
        goal(f"8: bakgrab (compress = auto) / {other} over {LINK_MBIT} Mbit/s, wall",
             ratio(wall("8", "bakgrab"), wall("8", other)) if slow else None,
             1.0 if other == "rsync_link" else None)
    mem = extra.get("worker_memory")
    goal("6: worker memory per concurrent grab (PSS), MiB",
         mem["per_grab_pss_kib"] / 1024 if mem else None, None, "MiB")
    if "bakgrab_btrfs" in results.get("1", results.get("2", {})).get("tools", {}):
        btrfs_goals(goal, wall, med, extra)
    return out


def btrfs_goals(goal: Any, wall: Any, med: Any, extra: dict[str, Any]) -> None:
    """Issue 14's goals, as ratios within this run."""
    for sid, what in (("2", "unchanged"), ("3", "1% changed")):
        for other, limit in (("borg", 0.8), ("bakgrab", 0.6), ("rsync_btrfs", None)):
            goal(f"{sid}: {what}, bakgrab on btrfs / {other}, wall",
                 ratio(wall(sid, "bakgrab_btrfs"), wall(sid, other)), limit)
    mib = 1 << 20
    added = med("4", "bakgrab_btrfs", "bytes_added")
    goal("4: bytes a 4 KiB change in the large file added on btrfs, MiB",
         added / mib if added is not None else None, 1.0, "MiB")
    unchanged = med("2", "bakgrab_btrfs", "bytes_added")
    goal("4: the same, less what an unchanged backup added (scenario 2), MiB",
         (added - unchanged) / mib if added is not None and unchanged is not None else None,
         None, "MiB")
    goal("4: bare rsync with the snapshot method, bytes added, MiB",
         (lambda v: v / mib if v is not None else None)(med("4", "rsync_btrfs", "bytes_added")),
         None, "MiB")
    deletes = extra.get("btrfs_delete_by_files") or {}
    if deletes:
        goal(f"7: removing a btrfs snapshot by the worker's call, slowest of "
             f"{', '.join(deletes)} files, s", max(deletes.values()), 0.1, "s")
    goal("7: bakgrab on btrfs removing the oldest (bakgrab prune, whole command), s",
         wall("7", "bakgrab_btrfs"), None, "s")
    goal("1: first full backup, bakgrab on btrfs / on ext4, wall",
         ratio(wall("1", "bakgrab_btrfs"), wall("1", "bakgrab")), 1.0)


def write_results(plan: Plan, doc: dict[str, Any]) -> tuple[Path, Path]:
    plan.out.mkdir(parents=True, exist_ok=True)
    js = plan.out / "results.json"
    md = plan.out / "results.md"
    js.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    md.write_text(report.markdown(doc))
    return js, md


# -- setup and teardown -------------------------------------------------------------------

@contextlib.contextmanager
def interrupts_unwind() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP unwind through every finally: block (SIGINT
    too when the shell started us in the background with it ignored)."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def find_bakgrab() -> str:
    here = Path(sys.executable).parent / "bakgrab"
    if here.exists():
        return str(here)
    venv = REPO / ".venv" / "bin" / "bakgrab"
    if venv.exists():
        return str(venv)
    found = shutil.which("bakgrab")
    if not found:
        raise SystemExit("bench: `bakgrab` not found: install the project first "
                         "(python3 -m venv .venv && .venv/bin/pip install -e '.[test]')")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    plan = parse_args(argv)
    missing = procs.missing_programs()
    if missing:
        print(f"bench: {procs.install_hint(missing)}", file=sys.stderr)
        return 2
    bakgrab = find_bakgrab()
    if os.geteuid() != 0:
        log("warning: not root: rsync --super cannot keep owners, and every tool may report "
            "errors on files it cannot read; the benchmark is meant to run as root (as CI does)")
    started = time.time()
    load_start = procs.load_average()
    work = Path(tempfile.mkdtemp(prefix="bakgrab-bench-", dir=plan.workdir))
    os.chmod(work, 0o755)  # noqa: S103 -- the tree inside must be readable like any tree
    opened: list[Any] = []
    try:
        with interrupts_unwind():
            log(f"{plan.mode} mode: {plan.spec.files} files, seed {plan.spec.seed}, "
                f"{plan.runs} runs ({plan.runs6} for scenario 6), work dir {work}")
            t = time.monotonic()
            tree = data.generate(work / "tree", plan.spec)
            tree["generate_seconds"] = time.monotonic() - t
            tree["bytes_on_disk"] = procs.disk_usage(work / "tree")[0]
            log(f"tree: {tree['files']} names, {tree['directories']} dirs, "
                f"{tree['bytes'] / 2**20:.1f} MiB")
            fs = None
            if plan.storage_fs == "loop":
                why = tools.LoopStorage.available(work)
                if why:
                    log(f"warning: storage in plain directories ({why}); first backups may "
                        "measure ext4's cost of reusing recently deleted inodes")
                else:
                    # borg wants a segment (500 MiB) and more free; the image is sparse.
                    size = max(2 << 30, 4 * tree["bytes_on_disk"] + (1 << 30))
                    (work / "images").mkdir()
                    fs = {}
                    kinds = dict.fromkeys(("bakgrab", "rsync", "rsync_auto", "rsnapshot",
                                           "borg"), "ext4")
                    btrfs_why = (tools.LoopStorage.available(work, "btrfs") if plan.btrfs
                                 else "--no-btrfs")
                    if btrfs_why:
                        log(f"btrfs rows not run: {btrfs_why}")
                    else:
                        kinds |= {"bakgrab_btrfs": "btrfs", "rsync_btrfs": "btrfs"}
                    for key, kind in kinds.items():
                        if plan.tools and key not in plan.tools:
                            continue
                        fs[key] = tools.LoopStorage(work / "images" / f"{key}.img",
                                                    work / "storage" / key, size, kind)
                        opened.append(fs[key])
            storage_note = ("each tool's own loop-mounted ext4 (a sparse image in the work dir), "
                            "made anew before every first backup" if fs else
                            "plain directories in the work dir, emptied with rm -rf")
            if fs and any(f.kind == "btrfs" for f in fs.values()):
                storage_note += ("; btrfs for bakgrab on btrfs and bare rsync's snapshot "
                                 "method, whose bytes added are the filesystem's used bytes "
                                 "(statvfs, after a commit)")
            ssh = tools.SshServer(work)
            opened.append(ssh)
            slow, link_tools, link_skipped = None, [], SlowLink.available()
            if link_skipped is None:
                slow = SlowLink(LINK_MBIT)  # scenario 8 (issue 19)
                opened.append(slow)
            bg = tools.Bakgrab(work, bakgrab, concurrency=max(2, plan.clients),
                               link_address=slow.here if slow else None)
            opened.append(bg)
            if slow is not None:
                far = tools.SshServer(work, listen=slow.there, wrap=slow.wrap, name="sshd-link")
                opened.append(far)
                link_tools = [bg, tools.BareRsync(work, far, key="rsync_link",
                                                  label="bare rsync -z, over the link")]
                far_choice = tools.auto_choice(slow.there)
                if far_choice is not None:
                    link_tools.append(tools.BareRsync(
                        work, far, compress=far_choice[0], ciphers=far_choice[1],
                        key="rsync_link_auto",
                        label=f"bare rsync, auto's choice ({far_choice[0]}), over the link"))
                link_tools.append(tools.BareRsync(work, far, compress="off", key="rsync_link_off",
                                                  label="bare rsync, no compression, over the link"))
            tool_list: list[tools.Tool] = [bg, tools.BareRsync(work, ssh)]
            chosen = tools.auto_choice("127.0.0.1")  # issue 19: bakgrab's flags exactly
            if chosen is not None:
                tool_list.append(tools.BareRsync(work, ssh, compress=chosen[0],
                                                 ciphers=chosen[1]))
            if fs and "bakgrab_btrfs" in fs:  # issue 14
                btrfs_bg = tools.Bakgrab(work, bakgrab, concurrency=max(2, plan.clients),
                                         key="bakgrab_btrfs", label="bakgrab on btrfs")
                opened.append(btrfs_bg)
                tool_list.append(btrfs_bg)
            if fs and "rsync_btrfs" in fs:
                tool_list.append(tools.SnapshotRsync(work, ssh, *(chosen or (None, ""))))
            tool_list += [tools.Rsnapshot(work, ssh), tools.Borg(work)]
            if plan.tools:
                tool_list = [t for t in tool_list if t.key in plan.tools]
            bench = Bench(plan, work, tool_list, fs)
            bench.link, bench.link_tools = slow, link_tools
            bench.link_skipped = link_skipped or ""
            bench.run_all()
            bench.extra["sandbox"] = sandbox_cost(work)
            bench.extra["request_check"] = request_check_cost(work)
            doc: dict[str, Any] = {
                "mode": plan.mode,
                "command": "python -m tests.bench.run" + (" --quick" if plan.mode == "quick"
                                                          else ""),
                "argv": list(sys.argv[1:] if argv is None else argv),
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "duration_seconds": time.time() - started,
                "load_average": {"start": load_start, "end": procs.load_average()},
                "machine": machine(work),
                "storage": storage_note,
                "versions": tools.versions(bakgrab),
                "tree": tree,
                "runs": plan.runs, "runs_scenario6": plan.runs6,
                "scenario6_second_backups": plan.second6,
                "tools": {t.key: {"label": t.label, **t.describe()}
                          for t in [*tool_list, *link_tools]},
                "scenarios": {sid: bench.results[sid] for sid in plan.scenarios},
                "fixed_cost": bench.extra.get("fixed_cost"),
                "worker_memory": bench.extra.get("worker_memory"),
                "sandbox": bench.extra.get("sandbox"),
                "request_check": bench.extra.get("request_check"),
                "verify": bench.extra.get("verify"),
                "btrfs_delete_by_files": bench.extra.get("btrfs_delete_by_files"),
                "cpu_note": report.CPU_NOTE,
            }
            # (a goal of a scenario this run left out has nothing to say)
            doc["goals"] = [g for g in goals(doc["scenarios"], bench.extra)
                            if g["goal"].split(":")[0] in plan.scenarios]
            js, md = write_results(plan, doc)
            log(f"done in {time.time() - started:.0f}s: {js} and {md}")
            print(md.read_text())
            return 0
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    except (subprocess.CalledProcessError, RuntimeError, TimeoutError) as e:
        log(f"failed: {e}")
        return 1
    finally:
        for thing in reversed(opened):
            with contextlib.suppress(Exception):
                thing.stop()
        if plan.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
