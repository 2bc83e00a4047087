"""Every failure of a command is one line and a documented exit code; an error
bakgrab did not foresee exits EXIT_INTERNAL (70), never 1 (issue 13)."""

from __future__ import annotations

from collections.abc import Iterator

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
