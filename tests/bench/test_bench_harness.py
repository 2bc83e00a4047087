"""The benchmark harness still works end to end (its numbers are not asserted).

Runs ``python -m tests.bench.run --quick`` on a tiny tree with one run per
scenario and two clients in scenario 6, then checks that results.json and
results.md hold every tool and every scenario (with btrfs, issue 14: bakgrab
on btrfs and bare rsync with its snapshot method), that every tool's newest
tree equals the source, and that nothing the harness started is left
running or on disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench import procs, run, tools

REPO = Path(__file__).resolve().parents[2]
TOOLS = {"bakgrab", "rsync", "rsync_auto", "rsnapshot", "borg"}
"""rsync_auto: bare rsync with the flags bakgrab's compress = auto chose (issue 19)."""
LINK_TOOLS = {"bakgrab", "rsync_link", "rsync_link_auto", "rsync_link_off"}
"""Scenario 8's, over the slow link (issue 19; the harness runs as root)."""
BTRFS_TOOLS = {"bakgrab_btrfs", "rsync_btrfs"}
"""Issue 14's, each on a btrfs loop image: where loop images and mkfs.btrfs work."""
TREES = {"bakgrab", "rsync", "rsync_auto", "rsnapshot"}
"""The tools that keep a tree to compare with the source (borg keeps a repository)."""
METRICS = {"wall", "cpu", "cpu_local", "cpu_server", "bytes_added", "inodes_added"}


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline[:200]}")
    return found


@pytest.mark.integration
def test_quick_mode_on_a_tiny_tree_reports_every_tool_and_scenario(tmp_path: Path) -> None:
    missing = procs.missing_programs()
    if missing:
        pytest.fail(procs.install_hint(missing))
    out = tmp_path / "out"
    work = tmp_path / "work"
    work.mkdir()
    btrfs = tools.LoopStorage.available(tmp_path, "btrfs") is None
    expected = TOOLS | (BTRFS_TOOLS if btrfs else set())
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench.run", "--quick", "--files", "200", "--scale", "0.1",
         "--large-mb", "1", "--runs", "1", "--runs6", "1", "--clients", "2", "--second6",
         "--out", str(out), "--workdir", str(work)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    doc = json.loads((out / "results.json").read_text())
    assert doc["mode"] == "quick"
    assert doc["tree"]["files"] == 200
    assert set(doc["scenarios"]) == set(run.SCENARIOS)
    for sid, scenario in doc["scenarios"].items():
        assert set(scenario["tools"]) == (LINK_TOOLS if sid == "8" else expected), sid
        for tool, res in scenario["tools"].items():
            parts = ([res] if sid != "6" else
                     [res[k] for k in ("concurrent", "serial", "concurrent_incremental",
                                       "serial_incremental")])
            for part in parts:
                assert set(part["median"]) == METRICS, (sid, tool)
                assert part["median"]["wall"] > 0, (sid, tool)
    assert doc["fixed_cost"]["median"]["client_wall"] > 0
    # the auto row ran the flags bakgrab's worker recorded for its grabs (issue 19)
    used = doc["tools"]["bakgrab"]["compress_used"]
    assert set(used["main"]) == {doc["tools"]["rsync_auto"]["compress"]}
    assert set(used["slow"]) == {doc["tools"]["rsync_link_auto"]["compress"]}
    assert doc["worker_memory"]["clients"] == 2
    assert {g["goal"].split(":")[0] for g in doc["goals"]} == (
        {"1", "2", "3", "5", "6", "8"} | ({"4", "7"} if btrfs else set()))
    # every tool with a tree wrote the source's (also checked by the run itself,
    # which fails on a difference): rsync -naHAX --checksum --delete lists nothing
    assert set(doc["verify"]) == TREES | (BTRFS_TOOLS if btrfs else set())
    assert {k: v["differences"] for k, v in doc["verify"].items()} == dict.fromkeys(
        doc["verify"], 0)
    if btrfs:
        # bare rsync ran the worker's btrfs options, and its snapshots are subvolumes
        snap = doc["tools"]["rsync_btrfs"]
        assert snap["flags_from"] == "bakgrab.worker.rsync.pull_argv"
        assert {"--inplace", "--no-whole-file", "--delete"} <= set(snap["rsync_options"])
        assert not [o for o in snap["rsync_options"] if o.startswith("--link-dest")]
        assert doc["btrfs_delete_by_files"]["2000"] > 0
        for sid in ("2", "3", "4"):  # a snapshot, not a copy: far less than a first backup
            assert (doc["scenarios"][sid]["tools"]["rsync_btrfs"]["median"]["bytes_added"]
                    < doc["scenarios"]["1"]["tools"]["rsync_btrfs"]["median"]["bytes_added"] / 4)
    # scenario 8's bakgrab grabs crossed the link with auto's choice for it
    assert doc["scenarios"]["8"]["link"]["rate_mbit"] == 20
    for key in ("nproc", "cpu", "memory", "disk"):
        assert doc["machine"][key]

    md = (out / "results.md").read_text()
    for title in run.SCENARIOS.values():
        if not title.startswith("8 clients"):
            assert title in md
    for label in ("bakgrab", "bare rsync", "rsnapshot", "borg (local, lz4)",
                  *(("bakgrab on btrfs",) if btrfs else ())):
        assert f"| {label} |" in md
    assert "## Goals" in md

    # Everything it started is stopped and unmounted, and its temp dir is gone.
    assert str(work) not in Path("/proc/mounts").read_text()
    assert list(work.iterdir()) == []
    assert processes_mentioning(str(work)) == []


def test_missing_programs_are_named_with_the_packages_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(procs, "find", lambda prog: None if prog in ("borg", "rsnapshot")
                        else f"/usr/bin/{prog}")
    hint = procs.install_hint(procs.missing_programs())
    assert "borg, rsnapshot" in hint or "rsnapshot, borg" in hint
    assert "apt-get install -y borgbackup rsnapshot" in hint
