"""The backed-up host's commands: ``backup``, ``restore`` and ``key``.

The ``bakgrab`` group (:mod:`bakgrab.tasks.cli`) finds them through the
``bakgrab.commands`` entry points; nothing here imports the worker.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from bakgrab.tasks import config
from bakgrab.tasks.cli import CONTEXT, exit_quickly, guarded, settings_from
from bakgrab.tasks.errors import BakgrabError, exit_code_for


def connection_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options with which a client reaches a backup host (backup, restore)."""
    options = [
        click.option("--broker", help="Broker URL as seen from the backup host when "
                     "tunnelling: redis://[USER[:PASSWORD]@]HOST[:PORT][/DB], or rediss:// for "
                     "TLS; no ?options (default: redis://127.0.0.1:6379/0)."),
        click.option("--tunnel", metavar="USER@HOST[:PORT]",
                     help="Reach the broker through `ssh -N -L` to this backup host."),
        click.option("--reverse", is_flag=True,
                     help="Behind NAT: offer the one-shot sshd on the backup host's loopback "
                          "through the tunnel (`ssh -R`) instead of being connected to."),
        click.option("--ssh-option", "ssh_options", multiple=True, metavar="OPT",
                     help="Extra -o option for the tunnel's ssh (repeatable)."),
        click.option("--address", help="Address the backup host connects back to "
                     "(default: this host's address towards it)."),
        click.option("--listen", help="Address the one-shot sshd listens on "
                     "(default: --address)."),
        click.option("--port", type=click.IntRange(0, 65535), default=0,
                     help="Port of the one-shot sshd (default: an ephemeral port)."),
        click.option("--allow-from", metavar="IP[,IP...]",
                     help="Peers allowed to connect (default: the backup host's addresses)."),
        click.option("--queue", help="Queue of the backup host (default: bakgrab)."),
        click.option("--timeout", "job_timeout", type=int,
                     help="Seconds to wait for the job to finish (default: 43200)."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def client_setup(ctx: click.Context, name: str, root: Path, excludes: list[str],
                 conn: dict[str, Any]) -> tuple[Any, config.Settings]:
    from bakgrab.client.backup import BackupOptions

    settings = settings_from(ctx, broker=conn["broker"], queue=conn["queue"],
                             job_timeout=conn["job_timeout"])
    opts = BackupOptions(
        name=name, source=root, excludes=excludes, address=conn["address"],
        listen=conn["listen"], port=conn["port"], allow_from=conn["allow_from"],
        tunnel=conn["tunnel"], ssh_options=conn["ssh_options"], reverse=conn["reverse"],
    )
    return opts, settings


@click.command(context_settings=CONTEXT)
@click.option("--name", required=True, help="Backup name of this host (letters, digits, _.-).")
@click.option("--source", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to back up (/ for the whole system).")
@click.option("--exclude-from", type=click.Path(dir_okay=False, path_type=Path),
              help="File of rsync exclude patterns, one per line.")
@click.option("--to", "targets", multiple=True, metavar="tunnel=U@H[:P],broker=URL,queue=Q",
              help="A backup host to send to (repeatable: all at once, each reported; the "
                   "exit status is non-zero if any failed). Unset parts come from "
                   "--tunnel, --broker and --queue.")
@click.option("--verify", is_flag=True,
              help="Have the backup host read back everything this pull wrote and compare it "
                   "with what it received before it publishes the snapshot (one more read of "
                   "the changed bytes; a mismatch is retried). Its verify_pull setting does "
                   "the same for every grab.")
@connection_options
@click.pass_context
@guarded
def backup(ctx: click.Context, name: str, source: Path, exclude_from: Path | None,
           targets: tuple[str, ...], verify: bool, as_json: bool, **conn: Any) -> None:
    """Ask the backup host for a backup of SOURCE and wait for it (backed-up host).

    Makes a one-time key in memory, starts a one-shot read-only sshd, sends the
    job and waits. Exits 0 on success, 1 for a partial snapshot, and on
    failure another code (README: exit codes; 70 for an error bakgrab did not
    expect) with a one-line message; on a terminal it shows progress, under
    cron it prints nothing but errors.
    """
    from bakgrab.client.backup import backup as run_backup
    from bakgrab.client.backup import read_excludes, terminal_progress

    exit_quickly()  # issue 19: the fixed cost of a job
    excludes = read_excludes(exclude_from) if exclude_from else []
    opts, settings = client_setup(ctx, name, source, excludes, conn)
    opts = dataclasses.replace(opts, verify=verify)
    if targets:
        backup_to_many(ctx, opts, settings, targets, as_json)
        return
    result = run_backup(opts, settings, progress=None if as_json else terminal_progress())
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(result.summary())
    if result.partial:
        sys.exit(1)


def backup_to_many(ctx: click.Context, opts: Any, settings: config.Settings,
                   specs: tuple[str, ...], as_json: bool) -> None:
    from bakgrab.client.backup import backup_many, parse_to

    outcomes = backup_many(opts, settings, [parse_to(s) for s in specs])
    report = []
    failed = 0  # the first failure's code; a failure outranks a partial snapshot (1)
    partial = False
    for target, outcome in outcomes:
        if isinstance(outcome, BaseException):
            failed = failed or exit_code_for(outcome)
            if isinstance(outcome, BakgrabError):
                msg = str(outcome)
            else:  # issue 13: one line, the traceback with --debug
                logging.getLogger("bakgrab").debug("to %s failed", target.label,
                                                   exc_info=outcome)
                msg = "internal error: " + " ".join(
                    f"{type(outcome).__name__}: {outcome}".split())[:300]
            report.append({"to": target.label, "ok": False, "error": msg,
                           "exit_code": exit_code_for(outcome)})
            if not as_json:
                click.echo(f"bakgrab: error: to {target.label}: {msg}", err=True)
        else:
            partial = partial or outcome.partial
            report.append({"to": target.label, "ok": True, "result": outcome.to_dict()})
            if not as_json:
                click.echo(f"to {target.label}: {outcome.summary()}")
    if as_json:
        click.echo(json.dumps(report, indent=2))
    sys.exit(failed or (1 if partial else 0))


@click.command(context_settings=CONTEXT)
@click.option("--name", required=True, help="Backup name of this host.")
@click.option("--snapshot", default="latest", show_default=True,
              help="Snapshot to restore from: 'latest' or NAME.YYYY-mm-dd.UNIXTIME.")
@click.option("--into", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Staging directory the files are restored into; created 0700 when it "
                   "does not exist (its parent must exist). Nothing outside it is ever "
                   "written, and its own mode and owner never change.")
@click.option("--privileged", is_flag=True,
              help="Insist on setuid/setgid bits, file capabilities, device nodes and other "
                   "users' ownership: refused (exit 10) unless --into is private (0700, "
                   "yours, on a path no other user can change). Into a private dir they "
                   "come back anyway; into any other they come back without their "
                   "privilege, each reported, and the exit status is 1.")
@click.argument("paths", nargs=-1, required=True)
@connection_options
@click.pass_context
@guarded
def restore(ctx: click.Context, name: str, snapshot: str, into: Path, privileged: bool,
            paths: tuple[str, ...], as_json: bool, **conn: Any) -> None:
    """Get PATHS back from a snapshot into a staging dir (backed-up host).

    Like a backup in reverse: a one-shot sshd whose gate allows only a
    write-only rsync receiver, and the backup host pushes the paths (relative
    to the snapshot root, e.g. etc/fstab) with all their metadata into a
    private dir inside --into; they are moved into --into when the transfer
    is done. Run as root or with the capabilities to restore owners and modes.
    Exits 0 when everything came back exactly, 1 when anything was left out,
    stripped of its privilege, vanished or could not be read (see --json).
    """
    from bakgrab.client.backup import terminal_progress
    from bakgrab.client.restore import restore as run_restore

    exit_quickly()  # issue 19
    opts, settings = client_setup(ctx, name, into, [], conn)
    result = run_restore(opts, settings, snapshot, list(paths),
                         progress=None if as_json else terminal_progress(),
                         privileged=privileged)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"{name}: restored {len(result['paths'])} path(s) of {result['snapshot']} "
                   f"into {into}: {result['files']} files in {result['duration']:.1f}s")
        for warning in result.get("warnings", []):
            click.echo(f"bakgrab: warning: {warning}", err=True)
        if result.get("stripped_count"):
            click.echo(f"bakgrab: warning: {result['stripped_count']} entries came back "
                       f"without their privilege ({into} is not private); --json lists them",
                       err=True)
        left_out = len(result.get("specials_skipped", [])) + len(result.get("refused", []))
        if left_out:
            click.echo(f"bakgrab: warning: {left_out} entries were not restored; --json "
                       "lists them", err=True)
    if result.get("partial"):
        sys.exit(1)


@click.command(context_settings=CONTEXT)
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The client's state dir (default: $XDG_STATE_HOME/bakgrab or "
                   "~/.local/state/bakgrab); run as the user that runs the backups.")
@click.pass_context
@guarded
def key(ctx: click.Context, state_dir: Path | None) -> None:
    """Print this client's public key, to register on the backup host (backed-up host).

    The key is the one-shot sshd's host key (made on first use, kept in the
    state dir); it signs every request (issue 11). On the backup host the
    operator runs `bakgrab trust NAME --key 'KEY'` (or add-client.sh --key
    'KEY' NAME).
    """
    from bakgrab.client import keys
    from bakgrab.tasks.config import default_state_dir

    settings = settings_from(ctx, state_dir=str(state_dir) if state_dir else None)
    directory = Path(settings.state_dir) if settings.state_dir else default_state_dir()
    click.echo(keys.host_key(directory)[1])
