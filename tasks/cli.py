"""``bakgrab``: the command group both sides share, and nothing of either.

Each side owns its commands (``bakgrab.client.cli``, ``bakgrab.worker.cli``)
and declares them as ``bakgrab.commands`` entry points of the distribution;
:class:`Commands` lists those whose module is installed and imports one only
when it runs. This module never imports ``client`` or ``worker``, so a
packager can ship the two sides apart and ``bakgrab --help`` lists what is
there. Every command turns a :class:`BakgrabError` into its message on
stderr and its exit code, and any other exception into a one-line "internal
error" and exit 70 (never 1, the code of a partial snapshot; issue 13);
tracebacks are for ``--debug`` only.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

from bakgrab.tasks import config
from bakgrab.tasks.errors import BakgrabError, exit_code_for

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def fail(exc: BaseException, debug: bool) -> NoReturn:
    """End the command with ``exc``'s exit code and a one-line message on
    stderr; the traceback only with ``--debug``."""
    if debug:
        logging.getLogger("bakgrab").error("failed", exc_info=exc)
    if isinstance(exc, BakgrabError):
        msg = f"error: {exc}"
    elif isinstance(exc, OSError):
        msg = f"error: {type(exc).__name__}: {exc}"
    else:  # a bug, or a case not turned into a BakgrabError yet (issue 13)
        what = " ".join(f"{type(exc).__name__}: {exc}".split())
        msg = (f"internal error: {what[:300]} (unexpected: run again with --debug for the "
               "traceback, and please report it)")
    click.echo(f"bakgrab: {msg}", err=True)
    sys.exit(exit_code_for(exc))


def settings_from(ctx: click.Context, **flags: Any) -> config.Settings:
    return config.load(flags, ctx.obj.get("config"))


def _sigterm(signum: int, frame: object) -> None:
    # Unwind through every finally: and ExitStack (sshd, tunnel, key files).
    raise SystemExit(128 + signum)


COMMANDS = "bakgrab.commands"
"""Entry-point group of the subcommands: ``name = module:click_command``."""

DOCTOR = "bakgrab.doctor"
"""Entry-point group of ``bakgrab doctor``'s halves: ``role = module:checks``."""


@dataclasses.dataclass(frozen=True)
class EntryPoint:
    """An entry point as its metadata's ``entry_points.txt`` states it
    (``name = module:attr``); the part of importlib.metadata's we use."""

    name: str
    value: str
    group: str

    @property
    def module(self) -> str:
        return self.value.partition(":")[0].strip()

    def load(self) -> Any:
        obj: Any = importlib.import_module(self.module)
        for attr in filter(None, self.value.partition(":")[2].strip().split(".")):
            obj = getattr(obj, attr)
        return obj


def entry_points() -> list[EntryPoint] | None:
    """bakgrab's entry points from the first ``bakgrab-*.dist-info`` on
    ``sys.path`` (the one importlib.metadata would take), read directly:
    importing importlib.metadata costs about 20 ms, a fifth of the client's
    start before its sshd listens (issue 19). None when there is none (an
    install without a dist-info): the caller asks importlib.metadata."""
    import configparser

    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in sorted(names):
            if not (name.startswith("bakgrab-") and name.endswith(".dist-info")):
                continue
            parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
            parser.optionxform = str  # type: ignore[assignment,method-assign]
            try:
                with open(os.path.join(entry or ".", name, "entry_points.txt")) as f:
                    parser.read_file(f)
            except FileNotFoundError:
                return []
            except (OSError, configparser.Error):
                return None
            return [EntryPoint(key, value, group) for group in parser.sections()
                    for key, value in parser.items(group)]
    return None


@functools.cache
def installed(group: str) -> dict[str, Any]:
    """The entry points of ``group`` whose module is present, by name.

    Only bakgrab's own metadata is read (not every distribution's), and a
    module counts as present when its package can be found: a host with only
    one side installed lists only that side's commands."""
    points: Any = entry_points()
    if points is None:
        from importlib import metadata

        try:
            points = metadata.distribution("bakgrab").entry_points
        except metadata.PackageNotFoundError:
            return {}
    found = {}
    for point in points:
        if point.group != group:
            continue
        try:
            present = importlib.util.find_spec(point.module) is not None
        except ModuleNotFoundError:
            present = False
        if present:
            found[point.name] = point
    return found


_quick_exit = False


def exit_quickly() -> None:
    """Let the process end without the interpreter's finalization once the
    running command is done (see :meth:`Commands.__call__`). For the client's
    job commands: tearing down Celery's, kombu's and redis' modules and
    objects took 30 to 80 ms of every job (issue 19)."""
    global _quick_exit
    _quick_exit = True


def quick_exit(code: object) -> None:
    """End the process now with ``code`` after what an orderly exit does that
    matters: atexit handlers (logging's flush, weakref finalizers such as
    temp dirs) and flushing stdout and stderr. Returns, doing nothing, where
    an orderly exit would differ: a code that is not a number, or a
    non-daemon thread still running (the interpreter would wait for it)."""
    import atexit
    import os
    import threading

    if not (code is None or isinstance(code, int)):
        return
    if any(t is not threading.main_thread() and not t.daemon and t.is_alive()
           for t in threading.enumerate()):
        return
    atexit._run_exitfuncs()  # runs each once and clears them
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return  # the orderly exit reports it (exit 120)
    os._exit(code or 0)


class Commands(click.Group):
    """A group whose commands are the installed ``bakgrab.commands`` entry
    points, each imported only when it is run or its help is shown."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Only the console script calls the group; click's CliRunner (tests)
        # calls main() and is never ended here.
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit as e:
            if _quick_exit:
                quick_exit(e.code)
            raise

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(installed(COMMANDS)))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        point = installed(COMMANDS).get(cmd_name)
        if point is None:
            return None
        try:
            loaded = point.load()
            if not isinstance(loaded, click.Command):
                raise TypeError(f"entry point {point.value} is not a click command")
        except Exception as e:  # noqa: BLE001 -- a broken install: one line, exit 70
            fail(e, bool(ctx.obj and ctx.obj.get("debug")))
        return loaded


@click.group(cls=Commands, context_settings=CONTEXT)
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML config file (default: $BAKGRAB_CONFIG, else /etc/bakgrab/bakgrab.toml "
                   "if it exists). Precedence: flag > BAKGRAB_* env > file > default.")
@click.option("--debug", is_flag=True, help="Log debug messages and show tracebacks.")
@click.version_option(package_name="bakgrab")
@click.pass_context
def main(ctx: click.Context, config_file: str | None, debug: bool) -> None:
    """bakgrab: pull-based backups over a one-shot, read-only sshd.

    A backed-up host runs `bakgrab backup`; a backup host runs `bakgrab worker`,
    which pulls the client's tree with rsync into hard-linked snapshots
    STORAGE/NAME.YYYY-mm-dd.UNIXTIME.
    """
    ctx.ensure_object(dict)
    ctx.obj["config"] = config_file
    ctx.obj["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    signal.signal(signal.SIGTERM, _sigterm)


def stdout_gone() -> bool:
    """Whether standard output is a pipe nobody reads any more (poll says
    POLLERR on a pipe's write end once its reader closed it)."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):
        return False
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poll.poll(0))


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command body, turning every error into a one-line message and
    a documented exit code (``exit_code_for``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.ClickException, click.exceptions.Exit):
            raise  # click's own: usage errors (exit 2) and ctx.exit()
        except click.exceptions.Abort:
            click.echo("bakgrab: interrupted", err=True)
            sys.exit(128 + signal.SIGINT)
        except KeyboardInterrupt as e:
            click.echo("bakgrab: interrupted", err=True)
            sys.exit(exit_code_for(e))
        except BrokenPipeError as e:
            if not stdout_gone():
                fail(e, ctx.obj.get("debug", False))
            # The reader of the output left (`bakgrab list | head`): end
            # quietly, as a program killed by SIGPIPE, and let nothing flush
            # into the closed pipe again at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(128 + signal.SIGPIPE)
        except Exception as e:  # every failure: a message and a documented code, never 1
            fail(e, ctx.obj.get("debug", False))

    return wrapper



# -- both sides ---------------------------------------------------------------

@main.command(context_settings=CONTEXT)
@click.option("--role", type=click.Choice(["worker", "client", "both"]), default="both",
              show_default=True, help="What this host is (both: every side installed here).")
@click.option("--storage", help="Storage directory to check (worker).")
@click.option("--user", help="Login user of the one-shot sshd (client; default: this user).")
@click.pass_context
@guarded
def doctor(ctx: click.Context, role: str, storage: str | None, user: str | None) -> None:
    """Check this host: programs, rsync >= 3.4, capabilities, account, storage.

    Prints one line per check (ok, warn or FAIL, with how to fix it) and exits
    2 if any check failed. Changes nothing.
    """
    from bakgrab.tasks.doctor import run

    settings = settings_from(ctx, storage=storage)
    halves = {name: point.load() for name, point in installed(DOCTOR).items()}
    checks = run(role, halves, user, settings.storage or None)
    for level, what, detail in checks:
        click.echo(f"{level:4}  {what}: {detail}")
    if any(level == "FAIL" for level, _, _ in checks):
        sys.exit(2)


@main.command(hidden=True, context_settings=CONTEXT)
def version() -> None:
    """Print the version."""
    from importlib.metadata import version as v

    click.echo(v("bakgrab"))


if __name__ == "__main__":
    main()
