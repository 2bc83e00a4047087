"""tasks/nofollow.descend: a walk through a tree another party writes that
follows no symlink, and closes what it opened whatever happens."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bakgrab.tasks.nofollow import DIR_FLAGS, descend


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_descends_through_directories(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    fd = descend(os.open(tmp_path, DIR_FLAGS), ["a", "b"])
    try:
        assert os.fstat(fd).st_ino == (tmp_path / "a" / "b").stat().st_ino
    finally:
        os.close(fd)
    same = os.open(tmp_path, DIR_FLAGS)
    assert descend(same, []) == same
    os.close(same)


@pytest.mark.parametrize("where", ["a", "b"])
def test_a_symlink_on_the_way_is_refused_and_nothing_left_open(tmp_path: Path,
                                                               where: str) -> None:
    """A symlink where a directory was (first or later on the way), even one
    to a real directory, ends the walk with an error; every fd is closed."""
    (tmp_path / "a" / "real").mkdir(parents=True)
    os.symlink(tmp_path / "a" / "real" if where == "a" else "real", tmp_path / "x")
    if where == "b":
        os.rename(tmp_path / "x", tmp_path / "a" / "b")
    names = ["x", "anything"] if where == "a" else ["a", "b"]
    before = open_fds()
    with pytest.raises(OSError):
        descend(os.open(tmp_path, DIR_FLAGS), names)
    assert open_fds() == before
