"""Settings: every default named here, one precedence for all of them.

Precedence, highest first: command-line flag > ``BAKGRAB_<SETTING>``
environment variable > config file (TOML, ``--config`` or ``BAKGRAB_CONFIG``;
``/etc/bakgrab/bakgrab.toml`` when it exists) > the defaults below.

This module is the only place that reads ``BAKGRAB_*`` variables. Values are
parsed and checked here, so the rest of the code receives typed settings.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bakgrab.tasks import DEFAULT_QUEUE
from bakgrab.tasks.errors import ConfigError

SYSTEM_CONFIG = Path("/etc/bakgrab/bakgrab.toml")
"""Config file read when neither ``--config`` nor ``BAKGRAB_CONFIG`` names one."""

ENV_PREFIX = "BAKGRAB_"

MIN_MESSAGE_BYTES = 512 << 10
"""Smallest ``max_message_bytes``: above the largest valid request (issue 11)."""

COMPRESS_RE = re.compile(r"auto|off|lz4|zstd:(?:[1-9]|1[0-9])|zlib:[1-9]")
"""The ``compress`` setting's values (issue 19)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of both sides, with its default."""

    broker: str = "redis://127.0.0.1:6379/0"
    """Broker URL (Redis). The result backend is the same Redis."""
    queue: str = DEFAULT_QUEUE
    """Queue a worker serves and a client sends to."""
    storage: str = ""
    """Worker: the storage directory holding snapshots (required for the worker)."""
    concurrency: int = 2
    """Worker: grabs run at once (prefork pool size)."""
    loglevel: str = "INFO"
    """Worker: Celery log level."""
    rsync_timeout: int = 300
    """Worker: rsync --timeout, seconds of I/O silence before a transfer is aborted."""
    connect_timeout: int = 20
    """Worker and client tunnel: ssh ConnectTimeout, seconds. The client gives
    up on a tunnel not ready within this plus 5 s (exit 10; issue 13)."""
    server_alive_interval: int = 15
    """Worker and client tunnel: ssh ServerAliveInterval, seconds (3 missed answers end it)."""
    max_retries: int = 3
    """Worker: retries of a transient failure (network, timeout, busy name)."""
    retry_backoff: float = 30.0
    """Worker: the retry delay's step, seconds: retry N waits a random time
    between half and all of retry_backoff * 2^(N-1), capped at retry_backoff_max
    (the first retry: 15 to 30 s by default)."""
    retry_backoff_max: float = 900.0
    """Worker: upper bound of a retry delay, seconds."""
    bwlimit: str = ""
    """Worker: rsync --bwlimit (e.g. ``10M``); empty for none."""
    compress: str = "auto"
    """Worker: rsync's compression on the wire (issue 19): ``auto`` chooses
    per grab from what the worker measures (off for a client on this host,
    rsync's own zstd level 3 for a link not measured yet, then zstd:1 or off
    as the previous grab's rate says the link is fast; see docs/benchmarks.md),
    ``off`` (no ``-z``), ``zstd:LEVEL`` (1-19), ``lz4``, ``zlib:LEVEL`` (1-9).
    A choice the client's rsync lacks is retried at once with rsync's own
    negotiation (``-z``) and recorded so."""
    sandbox: str = "landlock"
    """Worker: ``landlock`` confines each rsync to its own name's paths (needs
    Landlock ABI >= 2; the worker refuses to start without it); ``off`` runs
    rsync unconfined, which lets a hostile client read backup-host files through
    symlinks it stored (issue 11): only for kernels without Landlock, knowingly."""
    cancel_unwatched: str = "on"
    """Worker: ``on`` skips a grab or restore, before it connects, when no client
    waits for its result any more (nobody subscribed to the job's result in
    Redis: the client was interrupted or gave up), so a job that the shipped ACL
    keeps a client from revoking does not run later (issue 13); ``off`` runs
    it anyway."""
    max_names_per_client: int = 4
    """Worker, with ``enrol = "first-use"``: names one client key may enrol by
    itself; an operator's ``bakgrab trust`` registers more (issue 11)."""
    max_jobs_per_client: int = 2
    """Worker: grabs and restores that one client key (whatever names it has)
    runs at once; more wait as busy and are retried, so one client cannot take
    every worker slot (issue 11)."""
    min_rate: str = "16K"
    """Worker: a transfer whose rsync reads less than this many bytes a second
    (and is not busy on the CPU) for ``min_rate_window`` seconds is stopped and
    retried within max_retries, so a client trickling data cannot hold a worker
    slot (issue 11); ``0`` turns it off."""
    min_rate_window: int = 600
    """Worker: seconds over which ``min_rate`` is judged."""
    job_timeout: int = 12 * 3600
    """Client: seconds to wait for the job's final state before giving up."""
    state_dir: str = ""
    """Client: where the persistent sshd host key lives (default
    ``$XDG_STATE_HOME/bakgrab`` or ``~/.local/state/bakgrab``)."""
    min_free_abs: str = "1G"
    """Worker: free bytes the storage must have before a grab (size with unit)."""
    min_free_avg: float = 0.0
    """Worker: also keep this many average snapshots' worth of bytes free (0: off)."""
    min_free_inodes: int = 10000
    """Worker: free inodes the storage must have before a grab."""
    min_keep: int = 1
    """Worker: snapshots per name that cleanup never goes below (at least 1)."""
    stale_inprogress_age: int = 7 * 86400
    """Worker: age in seconds after which an abandoned in-progress dir is removed."""
    name_max_bytes: str = "auto"
    """Worker: a name's share of the storage's bytes (issue 11). When space is
    short, names over their share pay first (and a name over its share pays
    alone for its own grab). ``auto``: the storage's size divided by the number
    of names; a size (e.g. ``200G``) for each name; ``off``: no share, the
    classic rule only (any name may lose snapshots down to ``min_keep``)."""
    name_max_inodes: str = "auto"
    """Worker: a name's share of the storage's inodes: ``auto`` (the storage's
    inodes divided by the number of names), a number, or ``off``."""
    max_names: int = 100
    """Worker: names the storage may hold (names with snapshots, an in-progress
    dir or a registration); a grab of a new name beyond it is refused (exit 4)
    before anything is written. 0: no limit."""
    # -- keep rules by calendar (issue 16) --
    keep_within: str = ""
    """Worker: keep every snapshot younger than this duration (e.g. ``2d``,
    ``36h``; ``m`` is minutes, so a month is ``31d``); empty: off. The keep
    rules are those of ``borg prune``; with any of them set, a snapshot no
    rule keeps is removed by ``bakgrab prune`` and before each grab of its
    name; with none set, cleanup is by free space only."""
    keep_last: int = 0
    """Worker: keep the newest N snapshots of each name (0: off; for this and
    the counts below -1 keeps every period, as in borg)."""
    keep_hourly: int = 0
    """Worker: keep the newest snapshot of each of the last N hours that have one (0: off)."""
    keep_daily: int = 0
    """Worker: keep the newest snapshot of each of the last N days that have one (0: off)."""
    keep_weekly: int = 0
    """Worker: keep the newest snapshot of each of the last N ISO weeks (Monday
    to Sunday) that have one (0: off)."""
    keep_monthly: int = 0
    """Worker: keep the newest snapshot of each of the last N months that have one (0: off)."""
    keep_yearly: int = 0
    """Worker: keep the newest snapshot of each of the last N years that have one (0: off)."""
    keep: str = ""
    """Worker: keep rules of single names, overriding the rules above rule by
    rule, as ``NAME:RULE=N,...`` joined by ``;`` (e.g. ``db:daily=30,within=2d;
    web1:last=3``); in the file a table per name, ``[bakgrab.keep.db]`` with
    ``daily = 30`` and ``within = "2d"``."""
    timezone: str = "UTC"
    """Worker: the time zone (IANA name, e.g. ``Europe/Berlin``) whose calendar
    hours, days, weeks, months and years the keep rules count."""
    enrol: str = "registered"
    """Worker: who may back up a name (issue 11). ``registered``: only the
    client whose key the operator registered (``bakgrab trust NAME --key
    ...``); a request for any other name is refused. ``first-use``: a name
    with no registration is registered to the key of its first *successful*
    grab (a failed grab registers nothing); only for a trusted network."""
    request_window: int = 600
    """Worker: seconds a request's signing time may differ from the worker's
    clock at its first delivery (redeliveries of an accepted task id pass)."""
    request_public_key: str = ""
    """Client: the backup host's request public key (base64, printed by
    ``bakgrab worker`` at start). Empty: take it from the broker and pin it."""
    visibility_timeout: int = 24 * 3600
    """Broker: seconds an unacked grab (its worker died) waits before Redis hands
    it to another worker. Must exceed the longest grab: a running grab is not
    duplicated before this, and a lost one is redelivered after it."""
    job_time_limit: int = 20 * 3600
    """Worker: a grab running longer is stopped (soft limit: rsync is killed and
    the job fails); the hard limit is 5 minutes later."""
    max_message_bytes: str = "1M"
    """Worker: the largest queued task message it reads (issue 11); a larger one
    is dropped before it is decoded. The largest valid request is about 360 KiB
    (excludes and restore paths are capped at 256 KiB each), so at least 512K."""
    shutdown_grace: int = 60
    """Worker: on SIGTERM, running grabs may finish for this many seconds; then
    they are stopped and given back to the queue (set systemd's TimeoutStopSec
    above it)."""
    flower_address: str = "127.0.0.1"
    """Flower: address its web UI and API listen on (loopback; view it through ``ssh -L``)."""
    flower_port: int = 5555
    """Flower: port its web UI and API listen on."""
    flower_basic_auth: str = ""
    """Flower: ``USER:PASSWORD`` (several joined by commas) for HTTP basic auth;
    required, Flower does not start without it. Prefer the environment or the
    config file (0600) to the flag, which other local users can see in ps."""
    stale_after: str = "36h"
    """Status: a name whose last successful snapshot is older than this is
    STALE (seconds, or a duration like ``90m``, ``36h``, ``2d``)."""
    # -- monitoring: notifications, schedule, metrics (issue 17) --
    notify: str = ""
    """Backup host: where notices go, comma-separated (a TOML list in the
    file; ``bakgrab worker --notify URL``, repeatable): ``https://...`` or
    ``http://...`` webhooks (a JSON POST, docs/monitoring.md), ``mailto:ADDR``
    (through ``smtp_host``). Sent once per change of state: a grab failed for
    good, a partial snapshot, no space, a name gone stale, damage found by
    ``bakgrab verify``, the worker back after a crash, and each recovery."""
    notify_ping: str = ""
    """Backup host: per-name ping URLs (healthchecks.io style: ``URL/start``
    when a grab starts, ``URL`` on success, ``URL/fail`` on a final failure),
    as ``NAME=URL`` pairs, comma-separated; in the file a table
    ``[bakgrab.notify_ping]`` of ``NAME = "URL"``."""
    notify_retries: int = 5
    """Backup host: delivery attempts after the first to a target that fails."""
    notify_backoff: float = 30.0
    """Backup host: first delay in seconds before a delivery is retried;
    doubles each retry (up to ``retry_backoff_max``), with jitter."""
    notify_timeout: int = 10
    """Backup host: seconds one delivery (HTTP or SMTP) may take."""
    smtp_host: str = ""
    """Backup host: the SMTP relay for ``mailto:`` targets."""
    smtp_port: int = 587
    """Backup host: the relay's port."""
    smtp_security: str = "starttls"
    """Backup host: ``starttls`` (required, the certificate checked), ``tls``
    (implicit TLS, e.g. port 465) or ``none`` (a relay on loopback only)."""
    smtp_ca_file: str = ""
    """Backup host: CA certificates that sign the relay's certificate; empty:
    the system's."""
    smtp_user: str = ""
    """Backup host: the relay login; empty: no login."""
    smtp_password_file: str = ""
    """Backup host: a file (mode 0600 or stricter, owned by the worker's user)
    holding the relay password. Or set ``BAKGRAB_SMTP_PASSWORD`` in the
    environment file; never on a command line."""
    smtp_password: str = dataclasses.field(default="", repr=False)
    """Backup host: the relay password (prefer ``smtp_password_file``)."""
    smtp_from: str = ""
    """Backup host: the mails' sender; empty: ``bakgrab@<host name>``."""
    stale_check_every: str = "5m"
    """Scheduler: how often Celery beat asks the worker to look for stale
    names (a duration)."""
    prune_every: str = "1h"
    """Scheduler: how often the worker applies the keep rules to every name
    (what ``bakgrab prune`` does), so snapshots expire on time even for names
    that stopped backing up; only where keep rules are set (without them the
    cleanup runs before grabs only, as ever); ``off``: never (issue 16, 17)."""
    verify_every: str = "off"
    """Scheduler: how often the worker verifies ``verify_share`` of the stored
    files, as ``bakgrab verify --share`` does (a duration, e.g. ``1d``), a
    ``bakgrab.scheduled_verify`` task Flower shows; ``off``: never (issue 15)."""
    verify_share: str = "5%"
    """Scheduler: the share of the files each scheduled verify reads, least
    recently verified first (5% every day: every file every 20 days)."""
    beat: str = "off"
    """Worker: ``on`` runs the scheduler inside the worker (``bakgrab worker
    --beat``) instead of ``bakgrab scheduler``; only one per storage runs."""
    metrics_listen: str = ""
    """Scheduler: ``127.0.0.1:PORT`` serves Prometheus ``/metrics`` over HTTP
    (loopback addresses only); empty: off."""
    verify_pull: str = "off"
    """Worker: ``on`` re-reads every file a pull wrote from the disk (its
    cached pages flushed and dropped first) and compares it with the SHA-256
    taken right after the pull, before the snapshot appears (issue 15). Costs
    one more read of the changed bytes; a mismatch fails the attempt, which
    is retried and pulls those files again."""

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _coerce(name: str, value: Any) -> Any:
    """The typed value of a setting; text (flags, environment) is parsed, other
    TOML types must already be right (no silent truncation of 2.7 to 2)."""
    kind = FIELDS[name].type
    bad = ConfigError(f"setting {name}: {value!r} is not a valid {kind}")
    if isinstance(value, bool):
        raise bad
    try:
        if kind == "int":
            if isinstance(value, int):
                return value
            if isinstance(value, str):
                return int(value)
            raise bad
        if kind == "float":
            if isinstance(value, int | float | str):
                number = float(value)
                if not math.isfinite(number):
                    raise bad
                return number
            raise bad
        if isinstance(value, str | int) and not isinstance(value, bool):
            return str(value)
        if name in TEXT_LISTS:  # issue 17: a TOML list or table of text, as text
            return TEXT_LISTS[name](value, bad)
        raise bad
    except ValueError:
        raise bad from None


def _join_list(value: Any, bad: ConfigError) -> str:
    if not isinstance(value, list) or not all(isinstance(v, str) and "," not in v
                                              for v in value):
        raise bad
    return ",".join(value)


def _join_table(value: Any, bad: ConfigError) -> str:
    if not isinstance(value, dict) or not all(
            isinstance(v, str) and "," not in v and "=" not in k for k, v in value.items()):
        raise bad
    return ",".join(f"{k}={v}" for k, v in value.items())


def _join_keep(value: Any, bad: ConfigError) -> str:
    """``{NAME: {RULE: N}}`` (``[bakgrab.keep.NAME]`` tables) as keep text (issue 16)."""
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise bad
    parts = []
    for name, rules in value.items():
        items = []
        for rule, n in rules.items():
            if isinstance(n, bool) or not isinstance(n, int | str) or any(
                    c in str(n) + str(rule) + str(name) for c in ",;:="):
                raise bad
            items.append(f"{rule}={n}")
        parts.append(f"{name}:{','.join(items)}")
    return ";".join(parts)


TEXT_LISTS = {"notify": _join_list, "notify_ping": _join_table, "keep": _join_keep}
"""Settings kept as comma-separated text that a config file may give as a
list (``notify``) or a table (``notify_ping``, and ``keep``: a table of tables)."""


def load(
    flags: Mapping[str, Any] | None = None,
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Settings from flags, environment, config file and defaults, in that order.

    ``flags`` holds only the options given on the command line (None values
    are ignored, so click's defaults never shadow the environment).
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}

    path = config_file or environ.get(ENV_PREFIX + "CONFIG")
    if path:
        values.update(_read_file(Path(path), required=True))
    elif SYSTEM_CONFIG.exists():
        values.update(_read_file(SYSTEM_CONFIG, required=False))

    for name in FIELDS:
        env = environ.get(ENV_PREFIX + name.upper())
        if env is not None and env != "":
            values[name] = env
    for name, value in (flags or {}).items():
        if value is not None and name in FIELDS:
            values[name] = value

    settings = Settings(**{k: _coerce(k, v) for k, v in values.items()})
    check(settings)
    return settings


def _read_file(path: Path, required: bool) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist") from None
        return {}
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: {e}") from None
    if "bakgrab" in data:
        section = data["bakgrab"]
        if not isinstance(section, dict):
            raise ConfigError(f"config file {path}: [bakgrab] must be a table of settings")
        outside = sorted(set(data) - {"bakgrab"})
        if outside:
            raise ConfigError(f"config file {path}: setting(s) {', '.join(outside)} outside "
                              "the [bakgrab] table; put every setting inside it")
    else:
        section = data
    unknown = sorted(set(section) - set(FIELDS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return dict(section)


def check(settings: Settings) -> None:
    """Refuse settings that cannot work, naming the setting."""
    if settings.min_free_avg < 0:
        raise ConfigError("min_free_avg must be 0 (off) or a positive factor")
    if settings.min_keep < 1:
        raise ConfigError("min_keep must be at least 1: the newest snapshot is never removed")
    if settings.concurrency < 1:
        raise ConfigError("concurrency must be at least 1")
    if settings.max_retries < 0:
        raise ConfigError("max_retries must be 0 or more")
    for name in ("rsync_timeout", "connect_timeout", "server_alive_interval", "job_timeout"):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{name} must be a positive number of seconds")
    for name, parse in (("min_free_abs", parse_size), ("stale_after", parse_duration),
                        ("max_message_bytes", parse_size), ("min_rate", parse_size)):
        try:
            parse(getattr(settings, name))
        except ConfigError as e:
            raise ConfigError(f"setting {name}: {e}") from None
    if parse_size(settings.max_message_bytes) < MIN_MESSAGE_BYTES:
        raise ConfigError(f"max_message_bytes must be at least {MIN_MESSAGE_BYTES >> 10}K: "
                          "the largest valid request must fit")
    if not 1 <= settings.flower_port <= 65535:
        raise ConfigError("flower_port must be from 1 to 65535")
    if settings.bwlimit and not re.fullmatch(r"\d+(\.\d+)?[KMGkmg]?", settings.bwlimit):
        raise ConfigError(f"bwlimit {settings.bwlimit!r}: use a number with an optional K, M or G")
    if not COMPRESS_RE.fullmatch(settings.compress):  # issue 19
        raise ConfigError(f"compress {settings.compress!r}: auto, off, zstd:LEVEL (1-19), lz4 "
                          "or zlib:LEVEL (1-9)")
    if settings.max_names < 0:
        raise ConfigError("max_names must be 0 (no limit) or more")
    for name, parse_limit in (("name_max_bytes", parse_size), ("name_max_inodes", int)):
        value = getattr(settings, name)
        if value not in ("auto", "off"):
            try:
                if parse_limit(value) < 1:
                    raise ValueError(value)
            except (ConfigError, ValueError):
                raise ConfigError(f"setting {name}: {value!r}: use auto, off or a "
                                  + ("size" if name == "name_max_bytes" else "number")) from None
    for name, choices in (("cancel_unwatched", ("on", "off")), ("sandbox", ("landlock", "off")),
                          ("enrol", ("registered", "first-use"))):
        if getattr(settings, name) not in choices:
            raise ConfigError(f"{name} {getattr(settings, name)!r}: "
                              + " or ".join(f"'{c}'" for c in choices))
    if settings.max_names_per_client < 1:
        raise ConfigError("max_names_per_client must be at least 1")
    if settings.max_jobs_per_client < 1:
        raise ConfigError("max_jobs_per_client must be at least 1")
    if settings.min_rate_window < 10:
        raise ConfigError("min_rate_window must be at least 10 seconds")
    if settings.request_window <= 0:
        raise ConfigError("request_window must be a positive number of seconds")
    check_monitoring(settings)
    check_keep(settings)
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,200}", settings.queue):
        raise ConfigError(f"queue {settings.queue!r}: letters, digits and _.:- only")


KEEP_COUNTS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
"""The counted keep rules, in borg's order (``keep_within`` comes first)."""


def parse_keep(text: str) -> dict[str, dict[str, int | str]]:
    """The per-name keep rules of the ``keep`` setting: ``{NAME: {RULE: N}}``,
    RULE one of :data:`KEEP_COUNTS` or ``within`` (a duration); an optional
    ``keep_`` prefix is dropped. ConfigError names what is wrong."""
    out: dict[str, dict[str, int | str]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, rules = part.partition(":")
        name = name.strip()
        if not sep or not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
            raise ConfigError(f"setting keep: {part!r}: use NAME:RULE=N,... (e.g. db:daily=7)")
        found: dict[str, int | str] = {}
        for item in filter(None, (i.strip() for i in rules.split(","))):
            rule, eq, value = (x.strip() for x in item.partition("="))
            rule = rule.removeprefix("keep_")
            if not eq or rule not in KEEP_COUNTS + ("within",):
                raise ConfigError(f"setting keep: {name}: {item!r}: use RULE=N with RULE one "
                                  f"of within, {', '.join(KEEP_COUNTS)}")
            if rule == "within":
                if value:
                    parse_duration(value)
                found[rule] = value
            else:
                if not re.fullmatch(r"-1|\d+", value):
                    raise ConfigError(f"setting keep: {name}: {rule}={value!r}: a count "
                                      "(0: off, -1: every period)")
                found[rule] = int(value)
        out[name] = found
    return out


def check_keep(settings: Settings) -> None:
    """The keep rules and their time zone (issue 16)."""
    import zoneinfo

    for rule in KEEP_COUNTS:
        if getattr(settings, "keep_" + rule) < -1:
            raise ConfigError(f"keep_{rule} must be 0 (off), a count, or -1 (every period)")
    if settings.keep_within:
        try:
            parse_duration(settings.keep_within)
        except ConfigError as e:
            raise ConfigError(f"setting keep_within: {e}") from None
    parse_keep(settings.keep)
    try:
        zoneinfo.ZoneInfo(settings.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"timezone {settings.timezone!r}: not a time zone this host knows "
                          "(an IANA name like UTC or Europe/Berlin)") from None


def check_monitoring(settings: Settings) -> None:
    """The monitoring settings (issue 17); the targets' syntax is checked by
    :mod:`bakgrab.worker.notify` when the worker starts."""
    if settings.notify_retries < 0:
        raise ConfigError("notify_retries must be 0 or more")
    if settings.notify_timeout < 1:
        raise ConfigError("notify_timeout must be a positive number of seconds")
    if settings.notify_backoff <= 0:
        raise ConfigError("notify_backoff must be a positive number of seconds")
    if not 1 <= settings.smtp_port <= 65535:
        raise ConfigError("smtp_port must be from 1 to 65535")
    if settings.smtp_security not in ("starttls", "tls", "none"):
        raise ConfigError(f"smtp_security {settings.smtp_security!r}: starttls, tls or none")
    if settings.beat not in ("on", "off"):
        raise ConfigError(f"beat {settings.beat!r}: 'on' or 'off'")
    if settings.verify_pull not in ("on", "off"):  # issue 15
        raise ConfigError(f"verify_pull {settings.verify_pull!r}: 'on' or 'off'")
    try:
        parse_duration(settings.stale_check_every)
    except ConfigError as e:
        raise ConfigError(f"setting stale_check_every: {e}") from None
    if settings.prune_every != "off":
        try:
            parse_duration(settings.prune_every)
        except ConfigError as e:
            raise ConfigError(f"setting prune_every: {e} (or off)") from None
    if settings.verify_every != "off":  # issue 15
        try:
            parse_duration(settings.verify_every)
        except ConfigError as e:
            raise ConfigError(f"setting verify_every: {e} (or off)") from None
    parse_share(settings.verify_share)


def parse_share(text: str) -> float:
    """A share of the files, ``5%`` (or ``5``), as the fraction 0.05 (issue 15)."""
    try:
        share = float(str(text).strip().removesuffix("%")) / 100
    except ValueError:
        share = -1.0
    if not 0 < share <= 1:
        raise ConfigError(f"share {text!r}: a percentage above 0 and at most 100, e.g. 5%")
    return share


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes in a size like ``5G``, ``512M``, ``100000`` (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"size {text!r}: use a number with an optional K, M, G or T")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds (> 0) in a duration like ``36h``, ``1h30m``, ``2d`` or ``90`` (seconds)."""
    clean = str(text).strip().lower()
    number = r"\d+(?:\.\d+)?"
    if re.fullmatch(number, clean):
        seconds = float(clean)
    elif re.fullmatch(rf"(?:{number}[smhdw])+", clean):
        seconds = sum(float(n) * _DURATION_UNITS[u]
                      for n, u in re.findall(rf"({number})([smhdw])", clean))
    else:
        raise ConfigError(f"duration {text!r}: use seconds or e.g. 90s, 30m, 36h, 2d, 1w")
    if seconds <= 0:
        raise ConfigError(f"duration {text!r} must be more than 0")
    return seconds


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "bakgrab"
