"""bakgrab.worker.watchdog: a crawling process group is stopped, a working one
is not (issue 11, attack 5). Real processes, a window of seconds."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

from bakgrab.worker import watchdog


def group(script: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sh", "-c", script], start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def watched(script: str, min_rate: int, window: float, wait: float) -> tuple[str | None, bool]:
    """Run ``script`` under a RateWatch for ``wait`` seconds: whether it was
    judged stalled, and whether it was still alive when the wait ended."""
    proc = group(script)
    try:
        with watchdog.RateWatch(proc.pid, min_rate, window, every=0.25) as watch:
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
            alive = proc.poll() is None
        return watch.stalled, alive
    finally:
        stop(proc)


def test_an_idle_group_is_stopped_after_the_window() -> None:
    stalled, alive = watched("sleep 60", min_rate=1024, window=2, wait=8)
    assert stalled is not None and "min_rate=1024" in stalled
    assert not alive


def test_a_group_reading_fast_is_left_alone() -> None:
    stalled, alive = watched("cat /dev/zero > /dev/null", min_rate=1024, window=2, wait=5)
    assert stalled is None and alive


def test_a_group_busy_on_the_cpu_is_left_alone() -> None:
    """A pull linking a huge unchanged tree reads little but works: not a stall."""
    stalled, alive = watched("while :; do :; done", min_rate=1 << 30, window=2, wait=5)
    assert stalled is None and alive


def test_off_when_min_rate_is_zero() -> None:
    stalled, alive = watched("sleep 60", min_rate=0, window=1, wait=3)
    assert stalled is None and alive


def test_usage_counts_every_process_of_the_group() -> None:
    proc = group("head -c 5000000 /dev/zero > /dev/null; sleep 30")
    try:
        time.sleep(1)
        read, _ = watchdog.group_usage(proc.pid)
        assert read >= 5_000_000
    finally:
        stop(proc)
