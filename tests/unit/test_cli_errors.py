"""Every failure of a command is one line and a documented exit code; an error
bakgrab did not foresee exits EXIT_INTERNAL (70), never 1 (issue 13)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from bakgrab.tasks.cli import guarded, main
from bakgrab.tasks.errors import EXIT_INTERNAL, NoSpace


@click.command("boom")
@click.option("--what", default="bug")
@click.pass_context
@guarded
def boom(ctx: click.Context, what: str) -> None:
    if what == "bug":
        raise RuntimeError("something\nbakgrab did not foresee")
    raise NoSpace("the storage is full")


@pytest.fixture
def cli() -> Iterator[click.Group]:
    main.add_command(boom)
    yield main
    main.commands.pop("boom")


def test_unforeseen_error_exits_70_in_one_line(cli: click.Group) -> None:
    """(With --debug the traceback is logged too: the real process shows it,
    tests/integration/test_client_teardown.py.)"""
    result = CliRunner().invoke(cli, ["boom"])
    assert result.exit_code == EXIT_INTERNAL == 70
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("bakgrab:")]
    assert lines == ["bakgrab: internal error: RuntimeError: something bakgrab did not foresee "
                     "(unexpected: run again with --debug for the traceback, and please report it)"]
    assert "Traceback" not in result.stderr


def test_a_known_error_keeps_its_code(cli: click.Group) -> None:
    result = CliRunner().invoke(cli, ["boom", "--what", "nospace"])
    assert result.exit_code == NoSpace.exit_code == 6
    assert result.stderr.strip().splitlines()[-1] == "bakgrab: error: the storage is full"


def test_output_cut_short_by_its_reader_ends_quietly_as_sigpipe(tmp_path: Path) -> None:
    """`bakgrab list | head`: once the reader has left, the real command ends
    with 141 (128 + SIGPIPE), as a program killed by it would, and says
    nothing: no message, no "Exception ignored" at exit."""
    for i in range(3000):  # about 200 KiB of listing, more than a pipe holds
        (tmp_path / f"host{i % 7}.2026-01-01.{1767225600 + i}").mkdir()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "bakgrab"), "list", "--storage",
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"host0: ")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141, err
    assert err == b""


def test_stdout_gone_only_when_the_pipe_has_no_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """A BrokenPipeError of some other pipe is still an error: the quiet end
    is only for standard output whose reader left."""
    from bakgrab.tasks.cli import stdout_gone

    read_end, write_end = os.pipe()
    with open(write_end, "w") as out:
        monkeypatch.setattr(sys, "stdout", out)
        assert not stdout_gone()
        os.close(read_end)
        assert stdout_gone()
