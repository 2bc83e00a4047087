"""``bakgrab``: the command line of both sides.

Client commands import only ``client``; backup-host commands import
``worker`` inside their function, so a client host never loads worker code.
Every command turns a :class:`BakgrabError` into its message on stderr and
its exit code; tracebacks are for ``--debug`` only.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from tasks import config
from tasks.errors import BakgrabError, exit_code_for

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def fail(exc: BaseException, debug: bool) -> NoReturn:
    if debug:
        logging.getLogger("bakgrab").exception("failed")
    msg = str(exc) if isinstance(exc, BakgrabError) else f"{type(exc).__name__}: {exc}"
    click.echo(f"bakgrab: error: {msg}", err=True)
    sys.exit(exit_code_for(exc))


def settings_from(ctx: click.Context, **flags: Any) -> config.Settings:
    return config.load(flags, ctx.obj.get("config"))


def _sigterm(signum: int, frame: object) -> None:
    # Unwind through every finally: and ExitStack (sshd, tunnel, key files).
    raise SystemExit(128 + signum)


@click.group(context_settings=CONTEXT)
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


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command body, turning errors into a message and an exit code."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        try:
            return fn(*args, **kwargs)
        except (BakgrabError, OSError) as e:
            fail(e, ctx.obj.get("debug", False))
        except KeyboardInterrupt as e:
            click.echo("bakgrab: interrupted", err=True)
            sys.exit(exit_code_for(e))

    return wrapper


# -- backup host ---------------------------------------------------------------

@main.command(context_settings=CONTEXT)
@click.option("--storage", help="Storage directory for snapshots (must exist).")
@click.option("--broker", help="Broker URL, e.g. redis://127.0.0.1:6379/0.")
@click.option("--queue", help="Queue to serve (default: bakgrab).")
@click.option("--concurrency", type=int, help="Grabs run at once (default: 2).")
@click.option("--loglevel", help="Celery log level (default: INFO).")
@click.option("--min-free-abs", help="Free space to keep, e.g. 5G (default: 1G).")
@click.option("--min-free-avg", type=float,
              help="Also keep this many average snapshots' size free (default: 0, off).")
@click.option("--min-free-inodes", type=int, help="Free inodes to keep (default: 10000).")
@click.option("--min-keep", type=int,
              help="Snapshots per name cleanup never goes below (default: 1).")
@click.option("--max-retries", type=int, help="Retries of a transient failure (default: 3).")
@click.option("--rsync-timeout", type=int, help="rsync --timeout in seconds (default: 300).")
@click.option("--bwlimit", help="rsync --bwlimit, e.g. 10M (default: none).")
@click.pass_context
@guarded
def worker(ctx: click.Context, **flags: Any) -> None:
    """Run a Celery worker that serves `bakgrab.grab` (backup host).

    Starts a prefork pool with task events on. Before each grab it frees space
    by removing the oldest snapshots of the name that has the most (never below
    --min-keep per name), then pulls the client with rsync into STORAGE.
    """
    settings = settings_from(ctx, **flags)
    from worker.task import serve

    serve(settings)


@main.command("list", context_settings=CONTEXT)
@click.option("--storage", help="Storage directory.")
@click.option("--fast", is_flag=True,
              help="Skip the per-snapshot size (a walk of every snapshot).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@guarded
def list_(ctx: click.Context, storage: str | None, fast: bool, as_json: bool) -> None:
    """List every name with its snapshots, newest first (backup host).

    Per name: snapshot count and the newest one's age; per snapshot: time,
    state, and the space it holds alone (bytes no other snapshot shares by
    hard links: what removing it would free).
    """
    settings = settings_from(ctx, storage=storage)
    from tasks.result import human_bytes
    from worker.inventory import inventory

    if not settings.storage:
        raise config.ConfigError("give --storage DIR")
    data = inventory(Path(settings.storage), sizes=not fast)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    if not data:
        click.echo("no snapshots")
    for name in data:
        snaps = name["snapshots"]
        age = f", newest {human_age(name['newest_age'])} old" if snaps else ""
        click.echo(f"{name['name']}: {name['count']} snapshot(s){age}"
                   + (", a grab in progress or interrupted" if name["in_progress"] else ""))
        for s in snaps:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["timestamp"]))
            flag = "partial" if s["partial"] else "complete"
            alone = f"  {human_bytes(s['alone_bytes'])} alone" if "alone_bytes" in s else ""
            click.echo(f"  {s['snapshot']}  {when}  {flag}{alone}")


def human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


@main.command(context_settings=CONTEXT)
@click.option("--storage", help="Storage directory.")
@click.option("--dry-run", is_flag=True, help="Show what would be removed; remove nothing.")
@click.option("--min-free-abs", help="Free space to keep, e.g. 5G.")
@click.option("--min-free-avg", type=float, help="Average snapshots' worth of space to keep free.")
@click.option("--min-free-inodes", type=int, help="Free inodes to keep.")
@click.option("--min-keep", type=int, help="Snapshots per name never removed.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@guarded
def prune(ctx: click.Context, dry_run: bool, as_json: bool, **flags: Any) -> None:
    """Run the free-space cleanup now (backup host).

    The same rule as before every grab: while free space (or inodes) is below
    the need, remove the oldest snapshot of the name that has the most, never
    below --min-keep per name. Prints, in order, what it removes (or would)
    and why; exits 6 if it cannot free enough.
    """
    settings = settings_from(ctx, **flags)
    from worker.retention import make_room
    from worker.storage import Storage

    if not settings.storage:
        raise config.ConfigError("give --storage DIR")
    storage = Storage(settings.storage)
    if not dry_run:
        storage.prepare()
    elif not storage.state.is_dir():
        storage = storage.prepare()
    removed = make_room(storage, settings, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "removed": removed}, indent=2))
        return
    verb = "would remove" if dry_run else "removed"
    for entry in removed:
        if entry["snapshot"] is None:
            click.echo(f"cannot free enough: {entry['reason']} (min_keep={settings.min_keep})")
        else:
            click.echo(f"{verb} {entry['snapshot']}: {entry['reason']} ({entry['rule']})")
    if not removed:
        click.echo("enough free space; nothing to remove")


# -- backed-up host --------------------------------------------------------------

def connection_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options with which a client reaches a backup host (backup, restore)."""
    options = [
        click.option("--broker", help="Broker URL as seen from the backup host when "
                     "tunnelling (default: redis://127.0.0.1:6379/0)."),
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
    from client.backup import BackupOptions

    settings = settings_from(ctx, broker=conn["broker"], queue=conn["queue"],
                             job_timeout=conn["job_timeout"])
    opts = BackupOptions(
        name=name, source=root, excludes=excludes, address=conn["address"],
        listen=conn["listen"], port=conn["port"], allow_from=conn["allow_from"],
        tunnel=conn["tunnel"], ssh_options=conn["ssh_options"], reverse=conn["reverse"],
    )
    return opts, settings


@main.command(context_settings=CONTEXT)
@click.option("--name", required=True, help="Backup name of this host (letters, digits, _.-).")
@click.option("--source", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to back up (/ for the whole system).")
@click.option("--exclude-from", type=click.Path(dir_okay=False, path_type=Path),
              help="File of rsync exclude patterns, one per line.")
@click.option("--to", "targets", multiple=True, metavar="tunnel=U@H[:P],broker=URL,queue=Q",
              help="A backup host to send to (repeatable: all at once, each reported; the "
                   "exit status is non-zero if any failed). Unset parts come from "
                   "--tunnel, --broker and --queue.")
@connection_options
@click.pass_context
@guarded
def backup(ctx: click.Context, name: str, source: Path, exclude_from: Path | None,
           targets: tuple[str, ...], as_json: bool, **conn: Any) -> None:
    """Ask the backup host for a backup of SOURCE and wait for it (backed-up host).

    Makes a one-time key in memory, starts a one-shot read-only sshd, sends the
    job and waits. Exits 0 on success, non-zero with a message on failure; on
    a terminal it shows progress, under cron it prints nothing but errors.
    """
    from client.backup import backup as run_backup
    from client.backup import read_excludes, terminal_progress

    excludes = read_excludes(exclude_from) if exclude_from else []
    opts, settings = client_setup(ctx, name, source, excludes, conn)
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
    from client.backup import backup_many, parse_to

    outcomes = backup_many(opts, settings, [parse_to(s) for s in specs])
    report = []
    code = 0
    for target, outcome in outcomes:
        if isinstance(outcome, BaseException):
            code = code or exit_code_for(outcome)
            msg = str(outcome) if isinstance(outcome, BakgrabError) else repr(outcome)
            report.append({"to": target.label, "ok": False, "error": msg,
                           "exit_code": exit_code_for(outcome)})
            if not as_json:
                click.echo(f"bakgrab: error: to {target.label}: {msg}", err=True)
        else:
            if outcome.partial:
                code = code or 1
            report.append({"to": target.label, "ok": True, "result": outcome.to_dict()})
            if not as_json:
                click.echo(f"to {target.label}: {outcome.summary()}")
    if as_json:
        click.echo(json.dumps(report, indent=2))
    sys.exit(code)


@main.command(context_settings=CONTEXT)
@click.option("--name", required=True, help="Backup name of this host.")
@click.option("--snapshot", default="latest", show_default=True,
              help="Snapshot to restore from: 'latest' or NAME.YYYY-mm-dd.UNIXTIME.")
@click.option("--into", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Staging directory the files are restored into (must exist); nothing "
                   "outside it is ever written.")
@click.argument("paths", nargs=-1, required=True)
@connection_options
@click.pass_context
@guarded
def restore(ctx: click.Context, name: str, snapshot: str, into: Path, paths: tuple[str, ...],
            as_json: bool, **conn: Any) -> None:
    """Get PATHS back from a snapshot into a staging dir (backed-up host).

    Like a backup in reverse: a one-shot sshd whose gate allows only a
    write-only rsync receiver into --into, and the backup host pushes the paths
    (relative to the snapshot root, e.g. etc/fstab) with all their metadata.
    Run as root or with the capabilities to restore owners and modes.
    """
    from client.backup import terminal_progress
    from client.restore import restore as run_restore

    opts, settings = client_setup(ctx, name, into, [], conn)
    result = run_restore(opts, settings, snapshot, list(paths),
                         progress=None if as_json else terminal_progress())
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"{name}: restored {len(result['paths'])} path(s) of {result['snapshot']} "
                   f"into {into}: {result['files']} files in {result['duration']:.1f}s")
    if result.get("partial"):
        sys.exit(1)


@main.command(context_settings=CONTEXT)
@click.option("--storage", help="Storage directory.")
@click.option("--name", required=True, help="Backup name.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.argument("path")
@click.pass_context
@guarded
def versions(ctx: click.Context, storage: str | None, name: str, path: str,
             as_json: bool) -> None:
    """List the snapshots of NAME holding PATH, and when it changed (backup host).

    PATH is relative to the snapshot root (e.g. etc/fstab). A file is unchanged
    from the previous snapshot when both are the same inode (a hard link).
    """
    settings = settings_from(ctx, storage=storage)
    from worker.history import versions as find_versions

    if not settings.storage:
        raise config.ConfigError("give --storage DIR")
    rows = find_versions(Path(settings.storage), name, path)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"{path}: in no snapshot of {name}")
    for row in rows:
        if row["present"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["mtime"]))
            click.echo(f"{row['snapshot']}  {row['size']:>12}  {when}  "
                       f"{'changed' if row['changed'] else 'same'}")
        else:
            click.echo(f"{row['snapshot']}  {'absent':>12}")


@main.command(context_settings=CONTEXT)
@click.option("--storage", help="Storage directory.")
@click.option("--key", "public_key", metavar="'ssh-ed25519 AAAA...'",
              help="Pin this key now; without it the next request of NAME pins its key.")
@click.argument("name")
@click.pass_context
@guarded
def trust(ctx: click.Context, storage: str | None, public_key: str | None, name: str) -> None:
    """Re-pin NAME's sshd host key after a legitimate change (backup host).

    Snapshots are untouched. Without --key, the pin is removed and the next
    request for NAME is trusted on first use, as the very first one was.
    """
    settings = settings_from(ctx, storage=storage)
    from tasks.request import check_name, check_public_key, fingerprint
    from worker.storage import Storage, write_atomic

    if not settings.storage:
        raise config.ConfigError("give --storage DIR")
    store = Storage(settings.storage).prepare()
    pin = store.pin(check_name(name))
    old = pin.read_text().strip() if pin.exists() else None
    if public_key:
        line = check_public_key(public_key)
        write_atomic(pin, line + "\n", mode=0o644)
        click.echo(f"{name}: pinned {fingerprint(line)}"
                   + (f" (was {fingerprint(old)})" if old else ""))
    else:
        pin.unlink(missing_ok=True)
        click.echo(f"{name}: pin removed" + (f" (was {fingerprint(old)})" if old else "")
                   + "; the next request pins its key")


# -- monitoring (backup host) ------------------------------------------------------

@main.command(context_settings=CONTEXT)
@click.option("--broker", help="Broker URL, e.g. redis://127.0.0.1:6379/0.")
@click.option("--address", "flower_address", help="Address to listen on (default: 127.0.0.1).")
@click.option("--port", "flower_port", type=int, help="Port to listen on (default: 5555).")
@click.option("--basic-auth", "flower_basic_auth", metavar="USER:PASS",
              help="Required credentials (several joined by commas). Other local users can "
                   "read a flag in ps: prefer BAKGRAB_FLOWER_BASIC_AUTH or flower_basic_auth "
                   "in a 0600 config file.")
@click.pass_context
@guarded
def flower(ctx: click.Context, **flags: Any) -> None:
    """Run Flower to watch every grab: read-only, behind basic auth (backup host).

    Listens on loopback by default (view it with `ssh -L 5555:127.0.0.1:5555`);
    refuses to start without credentials. The tasks page shows each job's
    name, state, retries and runtime; see docs/monitoring.md.
    """
    settings = settings_from(ctx, **flags)
    from worker.flower import serve

    sys.exit(serve(settings))


@main.command(context_settings=CONTEXT)
@click.option("--storage", help="Storage directory.")
@click.option("--stale-after", metavar="DURATION",
              help="A name whose last success is older is STALE: seconds or e.g. 90m, 36h, 2d "
                   "(default: 36h).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--metrics-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write Prometheus metrics there, atomically (for node_exporter's "
                   "textfile collector: a *.prom file in its directory).")
@click.pass_context
@guarded
def status(ctx: click.Context, storage: str | None, stale_after: str | None, as_json: bool,
           metrics_file: Path | None) -> None:
    """Show whether every name was backed up recently (backup host; for cron).

    Per name: the last successful snapshot's age, duration and size, the
    count of failed grabs, and STALE when that success is older than
    --stale-after or missing. Exits 13 when any name is STALE, else 0.
    """
    settings = settings_from(ctx, storage=storage, stale_after=stale_after)
    from worker import status as name_status
    from worker.storage import Storage

    if not settings.storage:
        raise config.ConfigError("give --storage DIR")
    limit = config.parse_duration(settings.stale_after)
    statuses = name_status.collect(Storage(settings.storage), limit)
    if metrics_file:
        name_status.write_metrics(statuses, metrics_file)
    if as_json:
        click.echo(json.dumps({"stale_after": limit,
                               "names": [s.to_dict() for s in statuses]}, indent=2))
    else:
        click.echo(name_status.to_text(statuses, limit))
    sys.exit(name_status.exit_code(statuses))


@main.command(context_settings=CONTEXT)
@click.option("--role", type=click.Choice(["worker", "client", "both"]), default="both",
              show_default=True, help="What this host is.")
@click.option("--storage", help="Storage directory to check (worker).")
@click.option("--user", help="Login user of the one-shot sshd (client; default: this user).")
@click.pass_context
@guarded
def doctor(ctx: click.Context, role: str, storage: str | None, user: str | None) -> None:
    """Check this host: programs, rsync >= 3.4, capabilities, account, storage.

    Prints one line per check (ok, warn or FAIL, with how to fix it) and exits
    2 if any check failed. Changes nothing.
    """
    from tasks.doctor import run

    settings = settings_from(ctx, storage=storage)
    checks = run(role, user, settings.storage or None)
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
