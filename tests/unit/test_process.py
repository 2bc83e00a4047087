"""The child set-up of :func:`bakgrab.tasks.process.spawn`, run in real forks."""

from __future__ import annotations

import os

from bakgrab.tasks import process


def _fork_running(parent_of: int) -> int:
    """Exit status of a fork that runs the child set-up believing its parent
    is ``parent_of``: 0 if the set-up returned."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            process._child_setup(parent_of)
            os._exit(0)
        except BaseException:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_child_whose_parent_lives_goes_on() -> None:
    assert _fork_running(os.getpid()) == 0


def test_a_child_whose_parent_died_before_its_death_signal_was_set_dies() -> None:
    """The parent that started it is gone (here: another pid is named), so no
    parent-death signal would ever come: the child must not run on."""
    assert _fork_running(os.getpid() + 1_000_000) == 137
