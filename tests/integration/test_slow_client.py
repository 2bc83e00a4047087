"""A client that trickles its data cannot hold a worker slot: the worker stops
a pull that runs below min_rate for min_rate_window (issue 11, attack 5)."""

from __future__ import annotations

import json
import os
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
