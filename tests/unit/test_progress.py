"""A running grab's progress as one line in Flower's task view (issue 17, part 5)."""

from __future__ import annotations

from typing import Any

from celery.events.state import State

from bakgrab.worker import progress


def test_describe_reads_only_the_reporters_fields() -> None:
    line = progress.describe({"phase": "pulling", "bytes": 3 << 20, "percent": 42,
                              "rate": "30.52MB/s", "eta": "0:01:10", "files_done": 120,
                              "files_total": 300, "resumed": True, "backup": "web-01",
                              "x": "anything"})
    assert line == "pulling: 42% · 3.0 MiB · 30.52MB/s · ETA 0:01:10 · 120/300 files · resumed"
    assert progress.describe({"phase": "cleanup"}) == "cleanup"
    assert progress.describe({"phase": "<b>", "rate": "x" * 100, "percent": True}) == "working"


def test_flower_state_shows_progress_as_result_until_the_task_ends() -> None:
    """In Flower's event state: a progress event sets the task's result line,
    success replaces it with the real result, a retry clears it."""
    from flower.events import EventsState

    progress.install()
    progress.install()  # once only: no double wrapping
    state: State = EventsState(max_tasks_in_memory=100)
    base: dict[str, Any] = {"hostname": "w@h", "timestamp": 1.0, "local_received": 1.0,
                            "clock": 1, "pid": 1}

    def send(kind: str, **fields: Any) -> None:
        base["clock"] += 1
        state.event({"type": kind, "uuid": "t1", **base, **fields})

    send("task-received", name="bakgrab.grab", args="()", kwargs="{}", retries=0)
    send("task-started")
    send("task-progress", phase="pulling", bytes=1024, percent=5, rate="1.00kB/s",
         eta="0:00:20")
    assert state.tasks["t1"].result == "pulling: 5% · 1.0 KiB · 1.00kB/s · ETA 0:00:20"
    send("task-retried", exception="TransferInterrupted()")
    assert state.tasks["t1"].result is None
    send("task-progress", phase="pulling", percent=50)
    send("task-succeeded", result="{'name': 'web-01'}", runtime=1.0)
    assert state.tasks["t1"].result == "{'name': 'web-01'}"
