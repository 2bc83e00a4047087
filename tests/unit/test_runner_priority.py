"""conftest's runner_priority: a test that lowers the test process's CPU or
I/O priority (verify run in-process does) leaves the next test, and every
server it starts, at normal priority. The two tests run in this order, in
one process (pytest-xdist --dist loadfile keeps a file together)."""

from __future__ import annotations

import os
import subprocess


def test_verify_in_process_lowers_this_process_priority() -> None:
    from bakgrab.worker import verify

    assert verify.idle_priority()
    assert os.getpriority(os.PRIO_PROCESS, 0) >= 10


def test_the_next_test_runs_at_normal_priority_again() -> None:
    assert os.getpriority(os.PRIO_PROCESS, 0) == 0
    shown = subprocess.run(["ionice", "-p", str(os.getpid())], capture_output=True, text=True,
                           timeout=10, check=True).stdout
    assert "idle" not in shown, shown
