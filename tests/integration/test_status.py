"""`bakgrab status`: staleness, exit code and the Prometheus textfile, after real grabs."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import support
from tests.integration.test_flower import failed_task_ids, unreachable_backup

pytestmark = pytest.mark.integration

LIMIT = 4.0
"""--stale-after of the test, seconds: long enough for a grab and a status run."""


def status(storage: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([support.BAKGRAB, "status", "--storage", str(storage), *args],
                          capture_output=True, text=True, timeout=60)


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    """{(metric, name label): value} of a Prometheus text file."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        metric, label = series.split("{", 1)
        assert label.startswith('name="') and label.endswith('"}'), line
        out[(metric, label[len('name="'):-2])] = float(value)
    return out


@pytest.fixture
def no_retry_worker(tmp_path: Path, redis_url: str, storage: Path) -> Iterator[support.Proc]:
    """A worker that fails a transient error at once (no retry)."""
    proc = support.start_worker(storage, redis_url, tmp_path / "worker.log", "--max-retries", "0")
    yield proc
    proc.stop()


def test_status_marks_stale_names_and_writes_the_same_numbers_as_metrics(
    tmp_path: Path, redis_url: str, storage: Path, no_retry_worker: support.Proc
) -> None:
    """After real grabs: a name whose last success is older than --stale-after
    is STALE, a fresh one is not, a name that never succeeded is STALE; the
    exit code is 13 then, 0 when all are fresh; age, duration and size come
    from the last success's record, size being the bytes of the client's
    tree; failures count every grab that failed for good; the metrics file
    (0644, written by a rename) reports the same numbers as --json."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "one").write_bytes(b"1" * 1000)
    (src / "two").write_bytes(b"2" * 2345)
    client_state = tmp_path / "state"

    assert support.run_backup(redis_url, "old-host", src).returncode == 0
    shutil.rmtree(client_state)  # the client's key changes: the next grab is refused
    refused = support.run_backup(redis_url, "old-host", src)
    assert refused.returncode == 4, refused.stderr
    assert unreachable_backup(redis_url, "never-host", src).returncode == 9
    [old_snap] = support.snapshots(storage, "old-host")
    old_meta = json.loads((storage / ".bakgrab" / "meta" / f"{old_snap.name}.json").read_text())
    # Let old-host's last success age past the limit, then back up a fresh host.
    time.sleep(max(0.0, old_meta["finished"] + LIMIT + 0.5 - time.time()))
    fresh_run = support.run_backup(redis_url, "fresh-host", src, "--json")
    assert fresh_run.returncode == 0, fresh_run.stderr
    fresh_result = json.loads(fresh_run.stdout)

    metrics = tmp_path / "textfile" / "bakgrab.prom"
    metrics.parent.mkdir()
    done = status(storage, "--stale-after", f"{LIMIT:g}s", "--json",
                  "--metrics-file", str(metrics))
    assert done.returncode == 13, done.stderr
    report = json.loads(done.stdout)
    assert report["stale_after"] == LIMIT
    names: dict[str, dict[str, Any]] = {n["name"]: n for n in report["names"]}
    assert sorted(names) == ["fresh-host", "never-host", "old-host"]

    old, fresh, never_host = names["old-host"], names["fresh-host"], names["never-host"]
    assert (old["stale"], fresh["stale"], never_host["stale"]) == (True, False, True)
    assert old["snapshot"] == old_snap.name and old["age"] > LIMIT
    assert old["finished"] == old_meta["finished"]
    assert old["duration"] == old_meta["result"]["duration"] > 0
    assert old["total_size"] == old_meta["stats"]["total_size"] == 1000 + 2345
    # a refused request records nothing: it may come from anyone (issue 11)
    assert (old["failures"], fresh["failures"], never_host["failures"]) == (0, 0, 1)
    assert fresh["snapshot"] == fresh_result["snapshot"] and fresh["age"] < LIMIT
    assert fresh["total_size"] == fresh_result["total_size"] == 1000 + 2345
    assert fresh["duration"] == fresh_result["duration"]
    assert never_host["snapshot"] is None and never_host["last_failure"] > 0
    assert len(failed_task_ids(storage, "never-host")) == 1

    assert stat.S_IMODE(metrics.stat().st_mode) == 0o644
    assert [p.name for p in metrics.parent.iterdir()] == ["bakgrab.prom"]
    m = parse_metrics(metrics.read_text())
    for name in ("old-host", "fresh-host"):
        n = names[name]
        assert m[("bakgrab_last_success_timestamp_seconds", name)] == n["finished"]
        assert m[("bakgrab_last_success_bytes", name)] == n["total_size"]
        assert m[("bakgrab_last_success_duration_seconds", name)] == n["duration"]
    for name, n in names.items():
        assert m[("bakgrab_failures_total", name)] == n["failures"]
        assert m[("bakgrab_stale", name)] == int(n["stale"])
    # A name that never succeeded has no last_success sample (not a fake 0).
    assert ("bakgrab_last_success_timestamp_seconds", "never-host") not in m
    assert "# TYPE bakgrab_failures_total counter" in metrics.read_text()

    text = status(storage, "--stale-after", f"{LIMIT:g}s")
    assert text.returncode == 13
    rows = {line.split()[0]: line for line in text.stdout.splitlines()[1:-1]}
    assert rows["old-host"].rstrip().endswith("STALE")
    assert rows["fresh-host"].rstrip().endswith("ok")
    assert rows["never-host"].rstrip().endswith(
        "STALE (no successful snapshot; a grab in progress or interrupted)")
    assert "3.3 KiB" in rows["fresh-host"]
    assert text.stdout.splitlines()[-1].startswith("2 of 3 name(s) STALE")

    # With a limit none has passed, only the name that never succeeded is stale.
    assert status(storage, "--stale-after", "1h").returncode == 13
    shutil.rmtree(storage / ".bakgrab" / "failures")
    shutil.rmtree(storage / ".bakgrab" / "inprogress" / "never-host", ignore_errors=True)
    relaxed = status(storage, "--stale-after", "1h", "--metrics-file", str(metrics))
    assert relaxed.returncode == 0, relaxed.stdout + relaxed.stderr
    assert relaxed.stdout.splitlines()[-1] == "all 2 name(s) backed up within 1h"
    assert parse_metrics(metrics.read_text())[("bakgrab_stale", "old-host")] == 0


def test_stale_after_comes_from_environment_and_bad_values_are_refused(
    tmp_path: Path, storage: Path
) -> None:
    """--stale-after falls back to BAKGRAB_STALE_AFTER, then 36h; a value that
    is not a duration exits 3 with a message naming the expected form; an
    empty storage has nothing stale (exit 0)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAKGRAB_")}
    env["BAKGRAB_CONFIG"] = os.devnull

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([support.BAKGRAB, "status", "--storage", str(storage), "--json",
                               *args], capture_output=True, text=True, timeout=60,
                              env={**env, **extra})

    assert json.loads(run().stdout)["stale_after"] == 36 * 3600
    assert json.loads(run(BAKGRAB_STALE_AFTER="90m").stdout)["stale_after"] == 5400
    assert json.loads(run("--stale-after", "2d", BAKGRAB_STALE_AFTER="90m").stdout)[
        "stale_after"] == 2 * 86400
    bad = run("--stale-after", "soon")
    assert bad.returncode == 3
    assert "duration 'soon'" in bad.stderr and "36h" in bad.stderr
    assert run().returncode == 0
