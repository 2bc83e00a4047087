"""A client that trickles its data cannot hold a worker slot: the worker stops
a pull that runs below min_rate for min_rate_window (issue 11, attack 5)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests import support

pytestmark = pytest.mark.integration


def test_a_trickling_pull_is_stopped_and_the_slot_freed(tmp_path: Path, redis_url: str,
                                                        storage: Path) -> None:
    """With rsync held to 2 KiB/s (the worker's bwlimit stands in for a sender
    that trickles), a 64 KiB/s minimum over 10 s stops the pull within about
    that window: the client gets exit 9 naming min_rate, no snapshot appears,
    and the next grab on the one slot runs at once."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(4 << 20))
    env = support.worker_env(bwlimit="2K", min_rate="64K", min_rate_window="10",
                             max_retries="0")
    worker = support.start_worker(storage, redis_url, tmp_path / "worker.log",
                                  "--concurrency", "1", env=env)
    try:
        started = time.monotonic()
        done = support.run_backup(redis_url, "slow", src, "--json", timeout=120)
        took = time.monotonic() - started
        assert done.returncode == 9, (done.stdout, done.stderr)
        assert "min_rate=65536" in done.stderr
        assert 10 <= took < 45, took
        assert support.snapshots(storage, "slow") == []
        assert worker.alive()
        # the slot is free again: a small grab of another name completes
        small = tmp_path / "small"
        small.mkdir()
        (small / "f").write_bytes(b"x")
        again = support.run_backup(redis_url, "other", small, "--json", timeout=60)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["snapshot"].startswith("other.")
    finally:
        worker.stop()


def test_one_client_key_runs_at_most_max_jobs_per_client(tmp_path: Path, redis_url: str,
                                                          storage: Path) -> None:
    """Two names of one client key on a worker with two slots and
    max_jobs_per_client = 1: while the first name's slow pull runs, the
    second name's grab is refused as busy (exit 7, no snapshot), not run in
    the other slot; a grab of another client key does run there."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(2 << 20))
    small = tmp_path / "small"
    small.mkdir()
    (small / "f").write_bytes(b"x")
    env = support.worker_env(bwlimit="200K", max_jobs_per_client="1", max_retries="0")
    worker = support.start_worker(storage, redis_url, tmp_path / "worker.log",
                                  "--concurrency", "2", env=env)
    other_client = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "other-client")}
    try:
        first = subprocess.Popen(
            [support.BAKGRAB, "backup", "--broker", redis_url, "--name", "one", "--source",
             str(src), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            support.wait_for(lambda: (storage / ".bakgrab" / "inprogress" / "one").is_dir(),
                             60, "the first pull to start")
            second = support.run_backup(redis_url, "two", small, "--json", timeout=60)
            assert second.returncode == 7, (second.stdout, second.stderr)
            assert "slot" in second.stderr and support.snapshots(storage, "two") == []
            assert first.poll() is None, "the first pull ended before the check"
            third = support.run_backup(redis_url, "three", small, "--json", timeout=60,
                                       env=other_client)
            assert third.returncode == 0, third.stderr
            assert first.poll() is None, "the other client's grab did not run alongside"
            out, err = first.communicate(timeout=120)
            assert first.returncode == 0, err
        finally:
            if first.poll() is None:
                first.kill()
                first.wait(30)
    finally:
        worker.stop()
