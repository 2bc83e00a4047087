"""Keep rules by calendar, with the semantics of ``borg prune`` (issue 16).

Pure logic: no storage, no clock (``now`` is always given). Invariants:

* the rules are applied in borg's order: ``within`` (every snapshot younger
  than the duration), then ``last`` (borg's ``secondly``), ``hourly``,
  ``daily``, ``weekly`` (ISO weeks, Monday to Sunday), ``monthly``,
  ``yearly``; each counted rule walks the snapshots newest first and keeps
  the newest one of each period it meets, until it has kept N;
* a period whose newest snapshot an earlier rule already kept is passed over
  and not counted (borg: a snapshot kept by one rule is not counted again by
  the next), and its older snapshots are not considered for it either;
* when a rule ran out of snapshots before keeping N, it also keeps the oldest
  snapshot (borg's ``RULE[oldest]``), so a young history is not thinned;
* periods are calendar periods of the wall clock in the configured time zone
  (``zoneinfo``), compared between neighbours in time, exactly as borg does
  with ``strftime``: an hour repeated by a daylight-saving change is one
  period;
* with no rule set nothing is decided here: the caller keeps everything
  (no rules, no expiry: the free-space rule alone, as before issue 16).

Expiry (:func:`expired`) never returns a name's newest snapshot, a protected
one, or so many that fewer than ``min_keep`` would be left.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import zoneinfo
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from bakgrab.tasks.config import KEEP_COUNTS, ConfigError, Settings, parse_duration, parse_keep

PATTERNS = {
    "last": "%Y-%m-%d %H:%M:%S",
    "hourly": "%Y-%m-%d %H",
    "daily": "%Y-%m-%d",
    "weekly": "%G-%V",
    "monthly": "%Y-%m",
    "yearly": "%Y",
}
"""Each counted rule's period, as borg's ``PRUNING_PATTERNS`` (``last`` is
borg's ``secondly``: two snapshots in one second are one period)."""

Kept = dict[str, tuple[str, int]]
"""Snapshot id -> (rule, its number under that rule), as borg's ``kept_because``."""


@dataclasses.dataclass(frozen=True)
class Rules:
    """One name's keep rules: counts (0: off) and ``within`` (seconds; 0: off)."""

    within: float = 0.0
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within_text: str = ""

    @property
    def configured(self) -> bool:
        return bool(self.within) or any(getattr(self, r) for r in KEEP_COUNTS)

    def describe(self) -> str:
        parts = [f"keep_within={self.within_text}"] if self.within else []
        parts += [f"keep_{r}={getattr(self, r)}" for r in KEEP_COUNTS if getattr(self, r)]
        return ", ".join(parts) or "no keep rules"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {r: getattr(self, r) for r in KEEP_COUNTS if getattr(self, r)}
        if self.within:
            out["within"] = self.within_text
        return out


def make_rules(values: Mapping[str, int | str]) -> Rules:
    """Rules from ``{RULE: N}`` with ``within`` a duration text (checked)."""
    within_text = str(values.get("within", "") or "")
    counts = {r: int(values.get(r, 0) or 0) for r in KEEP_COUNTS}
    if any(n < -1 for n in counts.values()):
        raise ConfigError("keep counts must be 0 (off), a count, or -1 (every period)")
    return Rules(within=parse_duration(within_text) if within_text else 0.0,
                 within_text=within_text, **counts)


def rules_for(settings: Settings, name: str) -> Rules:
    """``name``'s rules: the ``keep_*`` settings, overridden rule by rule by
    its entry in the ``keep`` setting."""
    values: dict[str, int | str] = {r: getattr(settings, "keep_" + r) for r in KEEP_COUNTS}
    values["within"] = settings.keep_within
    values.update(parse_keep(settings.keep).get(name, {}))
    return make_rules(values)


def timezone(settings: Settings) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(settings.timezone)


def keep(snapshots: Mapping[str, int], rules: Rules, tz: dt.tzinfo, now: float,
         periods: dict[tuple[int, str], str] | None = None) -> Kept:
    """Which of ``snapshots`` (id -> UNIX time) the rules keep, and why; the
    rest expire. The same walk as borg's ``prune_within``/``prune_split``.
    ``periods`` caches each time's period across calls (the simulator's)."""
    periods = {} if periods is None else periods
    order = sorted(snapshots, key=lambda i: (snapshots[i], i), reverse=True)
    kept: Kept = {}
    if rules.within:
        counter = 0
        for ident in order:
            if snapshots[ident] > now - rules.within:
                counter += 1
                kept[ident] = ("within", counter)
    for rule in KEEP_COUNTS:
        wanted = getattr(rules, rule)
        if not wanted:
            continue
        pattern = PATTERNS[rule]
        last_period = None
        found = 0
        for ident in order:
            key = (snapshots[ident], rule)
            period = periods.get(key)
            if period is None:
                period = periods[key] = dt.datetime.fromtimestamp(key[0], tz).strftime(pattern)
            if period == last_period:
                continue
            last_period = period
            if ident not in kept:
                found += 1
                kept[ident] = (rule, found)
                if found == wanted:
                    break
        if order and wanted > 0 and found < wanted and order[-1] not in kept:
            kept[order[-1]] = (rule + "[oldest]", found + 1)
    return kept


def expired(
    snapshots: Sequence[tuple[str, int]],
    rules: Rules,
    tz: dt.tzinfo,
    now: float,
    *,
    protected: Collection[str] = (),
    min_keep: int = 1,
    periods: dict[tuple[int, str], str] | None = None,
) -> list[str]:
    """The ids of one name's snapshots (id, UNIX time) no rule keeps, oldest
    first, that expiry may remove: none when no rule is set; never the newest,
    a protected one, or so many that fewer than ``min_keep`` are left."""
    if not rules.configured or not snapshots:
        return []
    times = dict(snapshots)
    kept = keep(times, rules, tz, now, periods)
    order = sorted(times, key=lambda i: (times[i], i))
    newest = order[-1]
    out = []
    left = len(order)
    for ident in order:
        if left <= min_keep:
            break
        if ident in kept or ident == newest or ident in protected:
            continue
        out.append(ident)
        left -= 1
    return out


# -- the simulator (issue 16) --------------------------------------------------------

MAX_SIMULATED = 100_000
"""Backups a simulation may make (DAYS / every)."""


@dataclasses.dataclass(frozen=True)
class Simulation:
    """What exists after ``days`` of backups every ``every`` seconds, each
    grab preceded by expiry as the worker does it: the snapshots left
    (UNIX time -> rule at the end), newest first."""

    days: float
    every: float
    now: float
    rules: Rules
    made: int
    left: list[tuple[int, str, int]]

    def per_rule(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, rule, _ in self.left:
            out[rule] = out.get(rule, 0) + 1
        return out

    def to_dict(self, tz: dt.tzinfo) -> dict[str, Any]:
        return {
            "days": self.days, "every_seconds": self.every, "rules": self.rules.to_dict(),
            "backups_made": self.made, "count": len(self.left), "per_rule": self.per_rule(),
            "snapshots": [
                {"age_seconds": round(self.now - ts),
                 "time": dt.datetime.fromtimestamp(ts, tz).isoformat(),
                 "rule": rule, "number": n}
                for ts, rule, n in self.left
            ],
        }


def simulate(days: float, every: float, rules: Rules, tz: dt.tzinfo, now: float,
             *, min_keep: int = 1) -> Simulation:
    """Backups at ``now - k * every`` for the ``days`` up to ``now`` (the last
    one at ``now``), each grab first expiring what the rules no longer keep
    (at its own time), as ``bakgrab worker`` does."""
    if days <= 0 or every <= 0:
        raise ConfigError("--simulate DAYS and --every must be more than 0")
    count = int(days * 86400 // every) + 1
    if count > MAX_SIMULATED:
        raise ConfigError(f"--simulate {days:g} days every {every:g} s makes {count} backups; "
                          f"at most {MAX_SIMULATED}: choose a longer --every")
    have: list[tuple[str, int]] = []
    periods: dict[tuple[int, str], str] = {}
    for k in range(count - 1, -1, -1):
        t = int(now - k * every)
        gone = set(expired(have, rules, tz, t, min_keep=min_keep, periods=periods))
        have = [s for s in have if s[0] not in gone]
        for ident in gone:  # the cache holds only snapshots still there
            for rule in KEEP_COUNTS:
                periods.pop((int(ident), rule), None)
        have.append((str(t), t))
    times = dict(have)
    kept = keep(times, rules, tz, now)
    label = ("expires at the next grab" if rules.configured else
             "no keep rules: only the free-space rule removes it")
    left = sorted(((ts, *kept.get(ident, (label, 0))) for ident, ts in times.items()),
                  reverse=True)
    return Simulation(days, every, now, rules, count, left)
