"""A running grab's progress where Flower's task view shows it (issue 17, part 5).

The worker reports each rsync ``--info=progress2`` reading as a
``task-progress`` event (bytes, percent, rate, ETA, files; see
:func:`bakgrab.worker.task.reporter`). Flower keeps those fields but its task
page lists only Celery's own ones, so an operator saw ``PROGRESS`` and no
numbers. Installed in the ``bakgrab flower`` process, :func:`install` folds
each progress event into the task's ``result`` field as one line, e.g.
``pulling: 42% · 1.2 GiB · 30.52MB/s · ETA 0:01:10 · 120/300 files``, which the
task page and ``/api/task/info`` show. Invariants: the real result replaces it
when the task succeeds; a failure, retry, revoke or rejection clears it (no
stale numbers on an ended attempt); only fields the worker's reporter sends
are read, each shown only when it has the expected type, so nothing else of an
event is echoed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bakgrab.tasks.result import human_bytes

ENDED = frozenset({"task-failed", "task-retried", "task-revoked", "task-rejected"})
_installed: list[bool] = []


def describe(event: Mapping[str, Any]) -> str:
    """The one-line progress of a ``task-progress`` event."""
    phase = event.get("phase")
    phase = phase if isinstance(phase, str) and phase.isalpha() else "working"
    parts = []
    percent, sent = event.get("percent"), event.get("bytes")
    if isinstance(percent, int) and not isinstance(percent, bool):
        parts.append(f"{percent}%")
    if isinstance(sent, int) and not isinstance(sent, bool):
        parts.append(human_bytes(sent))
    for key, label in (("rate", ""), ("eta", "ETA ")):
        value = event.get(key)
        if isinstance(value, str) and len(value) <= 32:
            parts.append(f"{label}{value}")
    done, total = event.get("files_done"), event.get("files_total")
    if isinstance(done, int) and isinstance(total, int) and total > 0:
        parts.append(f"{done}/{total} files")
    if event.get("resumed") is True:
        parts.append("resumed")
    return f"{phase}: {' · '.join(parts)}" if parts else phase


def install() -> None:
    """Make Flower's event state show progress as the task's result (once)."""
    if _installed:
        return
    from flower.events import EventsState

    original = EventsState.event

    def event(self: EventsState, event: dict[str, Any]) -> Any:
        kind = event.get("type")
        if kind == "task-progress":
            event = {**event, "result": describe(event)}
        elif kind in ENDED and "result" not in event:
            event = {**event, "result": None}
        return original(self, event)

    EventsState.event = event  # type: ignore[method-assign]
    _installed.append(True)
