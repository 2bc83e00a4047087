"""The scheduler applies the keep rules on its own clock (issues 16, 17): a
name that stopped backing up still loses what its rules no longer keep, and
without keep rules the scheduled prune removes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import support

pytestmark = pytest.mark.integration


def three_snapshots(redis_url: str, storage: Path, tmp_path: Path) -> list[Path]:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / "f").write_text(f"version {i}\n")
        done = support.run_backup(redis_url, "alpha", src)
        assert done.returncode == 0, done.stderr
    snaps = support.snapshots(storage, "alpha")
    assert len(snaps) == 3  # a grab expires before it pulls: keep_last=2 of 2, then a third
    return snaps


@pytest.mark.parametrize("rules", [{"keep_last": "2"}, {}], ids=["keep_last=2", "no rules"])
def test_scheduler_expires_by_the_keep_rules(tmp_path: Path, redis_url: str, storage: Path,
                                            rules: dict[str, str]) -> None:
    env = support.worker_env(**rules)
    worker = support.start_worker(storage, redis_url, tmp_path / "worker.log", env=env)
    scheduler = None
    try:
        snaps = three_snapshots(redis_url, storage, tmp_path)
        before = worker.text().count("bakgrab.scheduled_prune")
        scheduler = support.Proc(
            [support.BAKGRAB, "scheduler", "--storage", str(storage), "--broker", redis_url,
             "--prune-every", "1s", "--stale-check-every", "1h"],
            tmp_path / "scheduler.log", env=env)
        support.wait_for(
            lambda: worker.text().count("bakgrab.scheduled_prune") >= before + 6
            or not scheduler.alive(), 60, "a few scheduled prunes")
        assert scheduler.alive(), scheduler.text()
        left = support.snapshots(storage, "alpha")
        if rules:
            assert left == snaps[1:], "the oldest is what keep_last=2 no longer keeps"
            assert "removed 1 snapshot(s)" in worker.text()
        else:
            assert left == snaps
            assert "no keep rules: nothing expires" in worker.text()
    finally:
        if scheduler is not None:
            scheduler.stop()
        worker.stop()
