"""bakgrab's own entry points, read without importlib.metadata (issue 19).

``bakgrab.tasks.cli.entry_points`` reads ``entry_points.txt`` of the first
``bakgrab-*.dist-info`` on sys.path directly (importing importlib.metadata
cost about 20 ms of every command's start); it must give what
importlib.metadata gives, and leave the answer to it when it finds nothing.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from bakgrab.tasks import cli


def test_the_same_entry_points_as_importlib_metadata() -> None:
    ours = cli.entry_points()
    assert ours is not None, "no bakgrab-*.dist-info found on sys.path"
    theirs = importlib.metadata.distribution("bakgrab").entry_points
    assert sorted((p.group, p.name, p.value) for p in ours) == sorted(
        (p.group, p.name, p.value) for p in theirs)
    assert {p.name for p in ours if p.group == cli.COMMANDS} >= {"backup", "worker"}
    backup = next(p for p in ours if p.group == cli.COMMANDS and p.name == "backup")
    assert backup.load() is importlib.import_module("bakgrab.client.cli").backup


def test_the_first_dist_info_on_the_path_counts(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """As importlib.metadata: the first dir of sys.path holding a
    dist-info wins; one without entry_points.txt has none; an unreadable
    one leaves the answer to importlib.metadata (None)."""
    first, second = tmp_path / "a", tmp_path / "b"
    for d, text in ((first, "[bakgrab.commands]\nHello = mod.sub:Attr.x\n"),
                    (second, "[bakgrab.commands]\nother = m:o\n")):
        (d / "bakgrab-9.dist-info").mkdir(parents=True)
        (d / "bakgrab-9.dist-info" / "entry_points.txt").write_text(text)
    (first / "bakgrab_extra-1.dist-info").mkdir()  # another project's: not ours
    monkeypatch.setattr(sys, "path", [str(tmp_path / "missing"), str(first), str(second)])
    [point] = cli.entry_points() or []
    assert (point.group, point.name, point.value, point.module) == (
        "bakgrab.commands", "Hello", "mod.sub:Attr.x", "mod.sub")
    (first / "bakgrab-9.dist-info" / "entry_points.txt").unlink()
    assert cli.entry_points() == []
    (first / "bakgrab-9.dist-info" / "entry_points.txt").write_text("not [ini\n")
    assert cli.entry_points() is None
    monkeypatch.setattr(sys, "path", [str(tmp_path / "missing")])
    assert cli.entry_points() is None


def test_the_cli_imports_no_importlib_metadata() -> None:
    """``bakgrab --help`` lists its commands without importing it."""
    code = ("import sys\nsys.argv = ['bakgrab', '--help']\nfrom bakgrab.tasks.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('METADATA', 'importlib.metadata' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert "backup" in done.stdout and "worker" in done.stdout
    assert done.stdout.rstrip().endswith("METADATA False"), done.stdout
