"""The backup host's commands: ``worker``, ``list``, ``prune``, ``protect``,
``unprotect``, ``versions``, ``trust``, ``flower``, ``status``, ``scheduler`` and ``verify``.

The ``bakgrab`` group (:mod:`bakgrab.tasks.cli`) finds them through the
``bakgrab.commands`` entry points and imports this module only when one of
them runs. Storage code is imported inside each command, so ``--help`` stays
cheap.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from bakgrab.tasks import config
from bakgrab.tasks.cli import CONTEXT, guarded, settings_from


def keep_options(command: Any) -> Any:
    """The keep rules' flags (issue 16), shared by ``worker`` and ``prune``."""
    for rule, what in reversed((("hourly", "hours"), ("daily", "days"), ("weekly", "ISO weeks"),
                                ("monthly", "months"), ("yearly", "years"))):
        command = click.option(f"--keep-{rule}", type=int, metavar="N",
                               help=f"Keep the newest snapshot of each of the last N {what} "
                                    "(-1: all; 0: off).")(command)
    command = click.option("--keep-last", type=int, metavar="N",
                           help="Keep the newest N snapshots of each name.")(command)
    command = click.option("--keep-within", metavar="DURATION",
                           help="Keep every snapshot younger than this (e.g. 2d, 36h).")(command)
    return click.option("--timezone", metavar="ZONE",
                        help="Time zone of the keep rules' calendar (default: UTC).")(command)


@click.command(context_settings=CONTEXT)
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
@click.option("--name-max-bytes",
              help="Each name's share of the bytes: auto (storage size / names), a size, or off.")
@click.option("--name-max-inodes",
              help="Each name's share of the inodes: auto, a number, or off.")
@click.option("--max-names", type=int,
              help="Names the storage may hold; a new one beyond is refused (default: 100).")
@keep_options
@click.option("--max-retries", type=int, help="Retries of a transient failure (default: 3).")
@click.option("--rsync-timeout", type=int, help="rsync --timeout in seconds (default: 300).")
@click.option("--bwlimit", help="rsync --bwlimit, e.g. 10M (default: none).")
@click.option("--compress", help="Compression on the wire: auto, off, zstd:LEVEL, lz4 or "
              "zlib:LEVEL (default: auto, chosen per grab from the link; docs/benchmarks.md).")
@click.option("--notify", "notify_to", multiple=True, metavar="URL",
              help="Send notices there: https://..., http://... or mailto:ADDR; repeatable "
                   "(replaces the notify setting; docs/monitoring.md).")
@click.option("--beat", is_flag=True, default=None,
              help="Also run the scheduler (Celery beat: stale checks) in this worker; "
                   "one per storage.")
@click.pass_context
@guarded
def worker(ctx: click.Context, notify_to: tuple[str, ...], beat: bool | None,
           **flags: Any) -> None:
    """Run a Celery worker that serves `bakgrab.grab` (backup host).

    Starts a prefork pool with task events on. Before each grab it expires
    the name's snapshots no keep rule keeps (--keep-daily 7 and the like, as
    in borg prune; nothing without keep rules), then frees space if short:
    snapshots no keep rule keeps go first, then names over their share
    (--name-max-bytes/--name-max-inodes) lose their oldest snapshots, then
    the name that has the most (never below --min-keep per name), never a
    protected snapshot; then it pulls the client with rsync into STORAGE.
    """
    if notify_to:  # issue 17
        flags["notify"] = ",".join(notify_to)
    settings = settings_from(ctx, **flags, beat="on" if beat else None)
    from bakgrab.worker.task import serve

    serve(settings)


@click.command("list", context_settings=CONTEXT)
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
    hard links, or on btrfs by extents: what removing it would free).
    """
    settings = settings_from(ctx, storage=storage)
    from bakgrab.tasks.result import human_bytes
    from bakgrab.worker.inventory import inventory

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
            if s.get("damaged_files"):  # issue 15
                flag += f", DAMAGED ({s['damaged_files']} bad file(s), see bakgrab verify)"
            if s.get("protected"):  # issue 16
                flag += f", {s['protected']['text']}"
            alone = f"  {human_bytes(s['alone_bytes'])} alone" if "alone_bytes" in s else ""
            click.echo(f"  {s['snapshot']}  {when}  {flag}{alone}")


def human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


@click.command(context_settings=CONTEXT)
@click.option("--storage", help="Storage directory.")
@click.option("--dry-run", is_flag=True, help="Show what would be removed; remove nothing.")
@click.option("--min-free-abs", help="Free space to keep, e.g. 5G.")
@click.option("--min-free-avg", type=float, help="Average snapshots' worth of space to keep free.")
@click.option("--min-free-inodes", type=int, help="Free inodes to keep.")
@click.option("--min-keep", type=int, help="Snapshots per name never removed.")
@click.option("--name-max-bytes", help="Each name's share of the bytes: auto, a size, or off.")
@click.option("--name-max-inodes", help="Each name's share of the inodes: auto, a number, or off.")
@keep_options
@click.option("--simulate", "simulate_days", type=float, metavar="DAYS",
              help="Remove nothing: show which snapshots DAYS of backups would leave under "
                   "the keep rules (no storage needed).")
@click.option("--every", metavar="DURATION",
              help="With --simulate: a backup this often (default: 1d).")
@click.option("--name", "sim_name", metavar="NAME",
              help="With --simulate: that name's rules (its entry in the keep setting) and "
                   "its average snapshot size.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@guarded
def prune(ctx: click.Context, dry_run: bool, as_json: bool, simulate_days: float | None,
          every: str | None, sim_name: str | None, **flags: Any) -> None:
    """Expire snapshots no keep rule keeps, then run the free-space cleanup (backup host).

    The same as before every grab, for every name. With keep rules
    (--keep-daily 7 and the like, as in borg prune; per name in the config
    file), a snapshot no rule keeps is removed, never a name's newest nor a
    protected one. Then, while free space (or inodes) is below the need:
    snapshots no rule keeps of any name, then the oldest of the name most
    over its share, down to its newest, then of the name that has the most,
    never below --min-keep per name. Prints, in order, what it removes (or
    would) and each one's rule; exits 6 if it cannot free enough.
    --simulate DAYS [--every 1d] shows instead which snapshots the rules
    would leave after DAYS of backups (and, given a storage, their space).
    """
    settings = settings_from(ctx, **flags)
    from bakgrab.worker.retention import make_room
    from bakgrab.worker.storage import Storage

    if simulate_days is not None:
        simulate(settings, simulate_days, every or "1d", as_json, sim_name)
        return
    if every or sim_name:
        raise click.UsageError("--every and --name go with --simulate DAYS")
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
        click.echo("nothing to remove: the keep rules keep every snapshot and free space "
                   "is enough")


def simulate(settings: config.Settings, days: float, every: str, as_json: bool,
             name: str | None) -> None:
    """``prune --simulate``: the snapshots DAYS of backups leave (issue 16)."""
    from bakgrab.tasks.result import human_bytes
    from bakgrab.worker import keep
    from bakgrab.worker.retention import cached_usage
    from bakgrab.worker.storage import Storage

    tz = keep.timezone(settings)
    rules = keep.rules_for(settings, name or "")
    sim = keep.simulate(days, config.parse_duration(every), rules, tz, time.time(),
                        min_keep=settings.min_keep)
    data = sim.to_dict(tz)
    data["timezone"] = settings.timezone
    data["name"] = name
    average = None
    if settings.storage:
        storage = Storage(settings.storage)
        inventory = storage.by_name() if storage.root.is_dir() else {}
        if name:
            inventory = {n: s for n, s in inventory.items() if n == name}
        count = sum(len(s) for s in inventory.values())
        if count:
            held = sum(cached_usage(storage, n, s).bytes for n, s in inventory.items())
            average = held // count
    data["average_snapshot_bytes"] = average
    data["space_bytes"] = None if average is None else average * len(sim.left)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"after {days:g} days of backups every {every} ({sim.made} made), with "
               f"{rules.describe()} (time zone {settings.timezone}):")
    counts = ", ".join(f"{rule} {n}" for rule, n in data["per_rule"].items())
    click.echo(f"{len(sim.left)} snapshot(s) left: {counts}")
    for entry in data["snapshots"]:
        number = f" #{entry['number']}" if entry["number"] else ""
        click.echo(f"  {human_age(entry['age_seconds']):>8} old  {entry['time']}  "
                   f"{entry['rule']}{number}")
    if average is not None:
        click.echo(f"space: {len(sim.left)} x {human_bytes(average)} (the average snapshot "
                   f"now) = {human_bytes(average * len(sim.left))}")
    elif settings.storage:
        click.echo("space: no snapshot yet to take an average size from")


@click.command("protect", context_settings=CONTEXT)
@click.option("--storage", help="Storage directory.")
@click.option("--until", metavar="DATE",
              help="Protect until then: a date (through its end) or a date and time, in the "
                   "keep rules' time zone (default: until unprotect).")
@click.option("--note", metavar="TEXT", help="Why, e.g. 'legal hold 2026-17'.")
@click.argument("snapshot")
@click.pass_context
@guarded
def protect_(ctx: click.Context, storage: str | None, until: str | None, note: str | None,
             snapshot: str) -> None:
    """Protect SNAPSHOT from every cleanup rule (backup host).

    A protected snapshot is never removed by the keep rules, the fair shares
    or the free-space rule; `list` marks it. The mark lives under
    STORAGE/.bakgrab/protected, never in the snapshot. A grab that cannot
    free enough space because of protections fails (exit 6) naming them.
    """
    settings = settings_from(ctx, storage=storage)
    from bakgrab.worker import keep, locks, protect
    from bakgrab.worker.retention import STORAGE_LOCK_WAIT
    from bakgrab.worker.storage import Storage

    if not settings.storage:
        raise config.ConfigError("give --storage DIR")
    store = Storage(settings.storage).prepare()
    tz = keep.timezone(settings)
    when = protect.parse_until(until, tz) if until else None
    # under the cleanup's lock: once this returns, no cleanup removes it
    with locks.held(store.storage_lock, wait=STORAGE_LOCK_WAIT, what="storage"):
        found = protect.protect(store, snapshot, when, note or "")
    click.echo(f"{found.snapshot}: {found.describe(tz)}")


@click.command(context_settings=CONTEXT)
@click.option("--storage", help="Storage directory.")
@click.argument("snapshot")
@click.pass_context
@guarded
def unprotect(ctx: click.Context, storage: str | None, snapshot: str) -> None:
    """Remove SNAPSHOT's protection: the cleanup rules apply to it again (backup host)."""
    settings = settings_from(ctx, storage=storage)
    from bakgrab.worker import protect
    from bakgrab.worker.storage import Storage

    if not settings.storage:
        raise config.ConfigError("give --storage DIR")
    old = protect.unprotect(Storage(settings.storage).prepare(), snapshot)
    click.echo(f"{snapshot}: protection removed" if old else f"{snapshot}: was not protected")


@click.command(context_settings=CONTEXT)
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
    from the previous snapshot when both are the same inode (a hard link; on
    btrfs the same inode number and ctime, which a snapshot keeps).
    """
    settings = settings_from(ctx, storage=storage)
    from bakgrab.worker.history import versions as find_versions

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
                       f"{'changed' if row['changed'] else 'same'}"
                       + ("  DAMAGED" if row.get("damaged") else ""))
        else:
            click.echo(f"{row['snapshot']}  {'absent':>12}")


@click.command(context_settings=CONTEXT)
@click.option("--storage", help="Storage directory.")
@click.option("--key", "public_key", metavar="'ssh-ed25519 AAAA...'",
              help="The client's key, as `bakgrab key` prints it on the client.")
@click.option("--from", "networks", metavar="NET[,NET...]",
              help="Addresses or networks (CIDR) the worker may connect to for NAME; "
                   "requests announcing any other address are refused (default: any).")
@click.option("--remove", is_flag=True, help="Remove NAME's registration instead.")
@click.argument("name")
@click.pass_context
@guarded
def trust(ctx: click.Context, storage: str | None, public_key: str | None,
          networks: str | None, remove: bool, name: str) -> None:
    """Register NAME to a client's key, or re-key it (backup host).

    Only requests signed by that key are accepted for NAME, and restores go
    only to it (issue 11). Run it when a client is added, and again when its
    key changes (a reinstalled client); the old key is refused from then on.
    Snapshots are untouched. --remove unregisters NAME: it is then refused,
    or, with the worker setting enrol = "first-use", registered to the key of
    its next successful grab.
    """
    settings = settings_from(ctx, storage=storage)
    from bakgrab.tasks.errors import InvalidRequest
    from bakgrab.tasks.request import check_name, check_public_key
    from bakgrab.worker import names
    from bakgrab.worker.storage import Storage

    if not settings.storage:
        raise config.ConfigError("give --storage DIR")
    if remove == bool(public_key) or (remove and networks):
        raise click.UsageError("give --key KEY [--from NET] to register NAME, or --remove")
    store = Storage(settings.storage).prepare()
    name = check_name(name)
    old = names.read(store, name)
    was = f" (was {old.fingerprint})" if old is not None and old.key else ""
    if remove:
        store.pin(name).unlink(missing_ok=True)
        then = ("registered to the key of its next successful grab (enrol = \"first-use\")"
                if settings.enrol == "first-use" else
                "refused until `bakgrab trust NAME --key ...`")
        click.echo(f"{name}: registration removed{was}; its requests are now {then}")
        return
    assert public_key is not None
    try:
        line = check_public_key(public_key)
        nets = names.parse_networks(networks) if networks else ()
    except InvalidRequest as e:
        raise config.ConfigError(f"--key: {str(e).removeprefix('host_key: ')}") from None
    except ValueError as e:
        raise config.ConfigError(f"--from {networks}: {e}") from None
    registration = names.Registration(line, nets)
    names.write(store, name, registration)
    where = f", from {', '.join(map(str, nets))}" if nets else ""
    click.echo(f"{name}: registered {registration.fingerprint}{where}{was}")


# -- monitoring (backup host) ------------------------------------------------------

@click.command(context_settings=CONTEXT)
@click.option("--broker", help="Broker URL, e.g. redis://127.0.0.1:6379/0.")
@click.option("--address", "flower_address", help="Address to listen on (default: 127.0.0.1).")
@click.option("--port", "flower_port", type=int, help="Port to listen on (default: 5555).")
@click.pass_context
@guarded
def flower(ctx: click.Context, **flags: Any) -> None:
    """Run Flower to watch every grab: read-only, behind basic auth (backup host).

    Listens on loopback by default (view it with `ssh -L 5555:127.0.0.1:5555`);
    refuses to start without credentials: USER:PASS pairs (joined by commas) in
    BAKGRAB_FLOWER_BASIC_AUTH or flower_basic_auth in a 0600 config file, never
    on the command line, where other local users could read them. The tasks page shows each job's
    name, state, retries and runtime; see docs/monitoring.md.
    """
    settings = settings_from(ctx, **flags)
    from bakgrab.worker.flower import serve

    sys.exit(serve(settings))


@click.command(context_settings=CONTEXT)
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
    from bakgrab.worker import status as name_status
    from bakgrab.worker.storage import Storage

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


@click.command(context_settings=CONTEXT)
@click.option("--storage", help="Storage directory (the worker's).")
@click.option("--broker", help="Broker URL, e.g. redis://127.0.0.1:6379/0.")
@click.option("--queue", help="Queue whose worker runs the checks (default: bakgrab).")
@click.option("--stale-check-every", metavar="DURATION",
              help="How often to look for stale names (default: 5m).")
@click.option("--stale-after", metavar="DURATION",
              help="A name whose last success is older is stale (default: 36h).")
@click.option("--prune-every", metavar="DURATION|off",
              help="How often the worker applies the keep rules to every name, where any "
                   "are set (default: 1h).")
@click.option("--metrics-listen", metavar="127.0.0.1:PORT",
              help="Also serve Prometheus /metrics there (loopback only; default: off).")
@click.option("--loglevel", help="Log level (default: INFO).")
@click.pass_context
@guarded
def scheduler(ctx: click.Context, **flags: Any) -> None:
    """Run Celery beat for the backup host: stale checks, keep rules, /metrics (backup host).

    Every --stale-check-every it asks the worker (on its internal queue) to
    look for names without a success within --stale-after; the worker sends
    a notice to each `notify` target when a name turns stale and when it
    recovers. Every --prune-every the worker expires what the keep rules no
    longer keep (as `bakgrab prune` does; nothing without keep rules). Run
    one per storage (a second is refused, exit 7), as the worker's user; see
    docs/monitoring.md.
    """
    settings = settings_from(ctx, **flags)
    from bakgrab.worker.schedule import serve

    serve(settings)


# -- checked snapshots (issue 15) -----------------------------------------------------

@click.command(context_settings=CONTEXT)
@click.option("--storage", help="Storage directory.")
@click.option("--name", help="Only the snapshots of this backup name.")
@click.option("--snapshot", help="Only this snapshot (its directory name).")
@click.option("--share", metavar="P%",
              help="Read only P% of the files, least recently verified first "
                   "(a nightly 5% covers every file in 20 nights).")
@click.option("--budget", metavar="DURATION",
              help="Read files, least recently verified first, for this long (e.g. 30m).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@guarded
def verify(ctx: click.Context, storage: str | None, name: str | None, snapshot: str | None,
           share: str | None, budget: str | None, as_json: bool) -> None:
    """Re-read stored files and compare them with their snapshots' manifests (backup host).

    Each file (inode) is read once however many snapshots share it, at idle
    I/O priority. Reports every bad file with every snapshot that holds it,
    damaged manifests, snapshots without a manifest (unverifiable) and how
    many files were never verified. A bad file is never linked into a new
    snapshot: the next backup of its name stores a fresh copy from the client.
    Exits 0 when all is good, 14 when it found damage (also damage found by an
    earlier run that older snapshots still hold), 1 when nothing is bad but
    some snapshot is unverifiable, 7 when another verify runs.
    """
    settings = settings_from(ctx, storage=storage)
    from bakgrab.tasks.errors import EXIT_DAMAGED, EXIT_WARNING
    from bakgrab.tasks.request import check_name
    from bakgrab.worker import verify as verifying
    from bakgrab.worker.storage import Storage

    if not settings.storage:
        raise config.ConfigError("give --storage DIR")
    if share and budget:
        raise click.UsageError("give --share or --budget, not both")
    fraction = config.parse_share(share) if share else None
    seconds = config.parse_duration(budget) if budget else None
    report = verifying.run(Storage(settings.storage).prepare(),
                           name=check_name(name) if name else None, snapshot=snapshot,
                           share=fraction, budget=seconds)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(verifying.to_text(report))
    if report.damage_found:
        sys.exit(EXIT_DAMAGED)
    sys.exit(EXIT_WARNING if report.unverifiable else 0)
