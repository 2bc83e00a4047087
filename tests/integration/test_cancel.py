"""A client that stops waiting cancels its queued job, under the shipped ACL
that denies clients Celery's remote control (issue 13, item 9): the worker
skips a job nobody waits for, before it connects anywhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests import support

pytestmark = pytest.mark.integration


def test_an_interrupted_clients_queued_job_is_skipped(tmp_path: Path, redis_url: str,
                                                      storage: Path) -> None:
    """One worker slot, busy with a slow grab; a second client's job waits in
    the queue and that client is killed (no revoke). When the slot frees, the
    worker takes the job, finds no client waiting and cancels it (exit 15 in
    its failure record): no in-progress dir, no snapshot. The slow grab, whose
    client waited, ran and completed."""
    slow_src = tmp_path / "slow"
    slow_src.mkdir()
    (slow_src / "big").write_bytes(os.urandom(3 << 20))
    small = tmp_path / "small"
    small.mkdir()
    (small / "f").write_text("x")
    env = support.worker_env(bwlimit="400K", max_retries="0")
    worker = support.start_worker(storage, redis_url, tmp_path / "worker.log",
                                  "--concurrency", "1", env=env)
    procs: list[subprocess.Popen[str]] = []
    try:
        def client(name: str, src: Path) -> subprocess.Popen[str]:
            proc = subprocess.Popen(
                [support.BAKGRAB, "backup", "--broker", redis_url, "--name", name, "--source",
                 str(src), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(proc)
            return proc

        slow = client("slow", slow_src)
        support.wait_for(lambda: (storage / ".bakgrab" / "inprogress" / "slow").is_dir(), 60,
                         "the slow pull to start")
        queued = client("queued", small)
        support.wait_for(lambda: "sent bakgrab.grab" in worker.text() or
                         subprocess.run(["redis-cli", "-u", redis_url, "llen", "bakgrab"],
                                        capture_output=True, text=True).stdout.strip() == "1",
                         30, "the second job queued")
        assert queued.poll() is None
        # SIGKILL: no revoke can come from it (as under the shipped ACL, which
        # denies clients the remote control a SIGTERMed client's revoke uses)
        queued.send_signal(signal.SIGKILL)
        assert queued.wait(30) == -signal.SIGKILL
        out, err = slow.communicate(timeout=120)
        assert slow.returncode == 0, err
        support.wait_for(lambda: "no client waits for it any more; cancelled" in worker.text(),
                         60, "the queued job taken and cancelled")
        assert not (storage / ".bakgrab" / "inprogress" / "queued").exists()
        assert support.snapshots(storage, "queued") == []
        assert len(support.snapshots(storage, "slow")) == 1
        records = [json.loads(line) for line in
                   (storage / ".bakgrab" / "failures" / "queued").read_text().splitlines()]
        assert [(r["error"], r["exit_code"]) for r in records] == [("JobCancelled", 15)]
        assert worker.alive()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        worker.stop()
