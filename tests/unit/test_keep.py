"""bakgrab.worker.keep: borg prune's keep rules, against a reference model
written separately, over random inventories and time zones (issue 16)."""

from __future__ import annotations

import datetime as dt
import itertools
import zoneinfo
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bakgrab.tasks import config
from bakgrab.tasks.errors import ConfigError
from bakgrab.worker import keep
from bakgrab.worker.keep import Rules
from bakgrab.worker.retention import FairQueue, Share
from bakgrab.worker.storage import snapshot_dirname
from tests.unit.test_retention import order, snapshots_of, usages_of

HYP = settings(database=None, deadline=None, max_examples=400)
UTC = dt.UTC

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "America/Sao_Paulo",
         "Asia/Kolkata", "Pacific/Chatham", "America/St_Johns", "Pacific/Apia", "Africa/Casablanca",
         "Asia/Tehran", "Europe/London", "America/Santiago", "Pacific/Kiritimati"]


# -- the reference model ---------------------------------------------------------------

def period_key(local: dt.datetime, rule: str) -> tuple[int, ...]:
    """The calendar period of a wall-clock time, from its fields."""
    if rule == "weekly":
        iso = local.isocalendar()
        return (iso.year, iso.week)
    fields = (local.year, local.month, local.day, local.hour, local.minute, local.second)
    size = {"last": 6, "hourly": 4, "daily": 3, "monthly": 2, "yearly": 1}[rule]
    return fields[:size]


def reference(times: Mapping[str, int], rules: Rules, tz: dt.tzinfo,
              now: float) -> dict[str, tuple[str, int]]:
    """borg prune as its documentation states it, written without the
    implementation: split the history (oldest first) into runs of neighbours
    in the same calendar period; each rule, in borg's order, takes runs newest
    first, keeps the newest snapshot of a run unless an earlier rule kept it
    (then the run counts for nothing), up to N runs; a rule left short keeps
    the oldest snapshot too."""
    ids = sorted(times, key=lambda i: (times[i], i))
    out: dict[str, tuple[str, int]] = {}
    if rules.within:
        young = [i for i in ids if now - times[i] < rules.within]
        for n, ident in enumerate(reversed(young), 1):
            out[ident] = ("within", n)
    for rule in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        wanted = getattr(rules, rule)
        if wanted == 0:
            continue
        local = {i: dt.datetime.fromtimestamp(times[i], UTC).astimezone(tz) for i in ids}
        runs = [list(g) for _, g in itertools.groupby(ids, key=lambda i: period_key(local[i], rule))]
        taken = 0
        for run in reversed(runs):
            if wanted != -1 and taken == wanted:
                break
            if run[-1] in out:
                continue
            taken += 1
            out[run[-1]] = (rule, taken)
        if ids and wanted > 0 and taken < wanted and ids[0] not in out:
            out[ids[0]] = (rule + "[oldest]", taken + 1)
    return out


# -- strategies ----------------------------------------------------------------------

T_MIN = int(dt.datetime(1995, 1, 1, tzinfo=UTC).timestamp())
T_MAX = int(dt.datetime(2035, 1, 1, tzinfo=UTC).timestamp())

counts = st.one_of(st.just(0), st.integers(1, 12), st.just(-1))


@st.composite
def rule_sets(draw: st.DrawFn) -> Rules:
    within = draw(st.one_of(st.just(0), st.integers(1, 90 * 86400)))
    return Rules(within=float(within), within_text=f"{within}s" if within else "",
                 **{r: draw(counts) for r in config.KEEP_COUNTS})


@st.composite
def histories(draw: st.DrawFn) -> dict[str, int]:
    """Snapshots clustered like real ones (steps of seconds to months),
    sometimes around a daylight-saving change of the drawn zone."""
    start = draw(st.integers(T_MIN, T_MAX))
    steps = draw(st.lists(st.one_of(st.integers(0, 120), st.integers(60, 7200),
                                    st.integers(3600, 3 * 86400), st.integers(86400, 120 * 86400)),
                          min_size=0, max_size=40))
    t, out = start, {}
    for k, step in enumerate([0, *steps]):
        t += step
        out[f"s{k}"] = t
    return out


def dst_history(tz: zoneinfo.ZoneInfo, year: int, draw: st.DrawFn) -> dict[str, int]:
    """Snapshots every few minutes across the zone's first offset change of ``year``."""
    t = int(dt.datetime(year, 1, 1, tzinfo=UTC).timestamp())
    base = dt.datetime.fromtimestamp(t, tz).utcoffset()
    while t < int(dt.datetime(year + 1, 1, 1, tzinfo=UTC).timestamp()):
        if dt.datetime.fromtimestamp(t, tz).utcoffset() != base:
            break
        t += 3600
    start = t - draw(st.integers(2, 30)) * 3600
    step = draw(st.integers(60, 1800))
    return {f"d{k}": start + k * step for k in range(draw(st.integers(1, 80)))}


# -- properties ----------------------------------------------------------------------

@HYP
@given(times=histories(), rules=rule_sets(), zone=st.sampled_from(ZONES),
       now_after=st.integers(0, 200 * 86400))
def test_keep_matches_the_reference_model(times: dict[str, int], rules: Rules, zone: str,
                                          now_after: int) -> None:
    """Every snapshot kept, with its rule and number, is what the reference
    model keeps, in fixed zones with and without daylight saving."""
    tz = zoneinfo.ZoneInfo(zone)
    now = max(times.values(), default=T_MIN) + now_after
    assert keep.keep(times, rules, tz, now) == reference(times, rules, tz, now)


@HYP
@given(data=st.data(), rules=rule_sets(), zone=st.sampled_from(ZONES[1:]),
       year=st.integers(2000, 2030))
def test_keep_across_daylight_saving_changes(data: st.DataObject, rules: Rules, zone: str,
                                             year: int) -> None:
    """Dense snapshots across a zone's offset change: a repeated wall-clock
    hour is one period, a skipped one none; the same as the model."""
    tz = zoneinfo.ZoneInfo(zone)
    times = dst_history(tz, year, data.draw)
    now = max(times.values()) + 60
    assert keep.keep(times, rules, tz, now) == reference(times, rules, tz, now)


@settings(database=None, deadline=None, max_examples=150)
@given(times=histories(), rules=rule_sets(), zone=st.timezones(),
       now_after=st.integers(0, 30 * 86400))
def test_keep_in_any_zone(times: dict[str, int], rules: Rules, zone: dt.tzinfo,
                          now_after: int) -> None:
    """The same over every zone of the host's tz database."""
    now = max(times.values()) + now_after
    assert keep.keep(times, rules, zone, now) == reference(times, rules, zone, now)


@HYP
@given(times=histories(), rules=rule_sets(), zone=st.sampled_from(ZONES),
       min_keep=st.integers(1, 5), protected=st.sets(st.sampled_from([f"s{k}" for k in range(8)])))
def test_expiry_spares_the_newest_protected_and_min_keep(
        times: dict[str, int], rules: Rules, zone: str, min_keep: int, protected: set[str]) -> None:
    """Expiry removes only what no rule keeps, oldest first, never the newest,
    a protected snapshot, or below min_keep; with no rules, nothing."""
    tz = zoneinfo.ZoneInfo(zone)
    now = max(times.values()) + 3600
    gone = keep.expired(list(times.items()), rules, tz, now, protected=protected,
                        min_keep=min_keep)
    if not rules.configured:
        assert gone == []
        return
    kept = reference(times, rules, tz, now)
    newest = max(times, key=lambda i: (times[i], i))
    assert newest not in gone and not set(gone) & protected and not set(gone) & set(kept)
    assert len(times) - len(gone) >= min(min_keep, len(times))
    assert gone == sorted(gone, key=lambda i: (times[i], i))
    removable = [i for i in sorted(times, key=lambda i: (times[i], i))
                 if i not in kept and i != newest and i not in protected]
    assert gone == removable[:max(0, len(times) - min_keep)][:len(gone)]
    assert len(gone) == min(len(removable), max(0, len(times) - min_keep))


# -- borg's worked example -------------------------------------------------------------

def test_borgs_worked_example() -> None:
    """borg's docs/misc/prune-example.txt: a backup every day of 2015 but
    2015-12-19, pruned on 2016-01-01 with --keep-daily 14 --keep-monthly 6
    --keep-yearly 1: the 14 newest days (back to 12-17, as 12-19 has none),
    then the last day of each month from November back to June (December's
    last day is already kept by the daily rule: it is not counted again), and
    the yearly rule, finding 2015's newest already kept and no older year,
    keeps the oldest backup, 2015-01-01."""
    tz = zoneinfo.ZoneInfo("UTC")
    times = {}
    day = dt.date(2015, 1, 1)
    while day.year == 2015:
        if day != dt.date(2015, 12, 19):
            times[day.isoformat()] = int(dt.datetime(day.year, day.month, day.day, 12,
                                                     tzinfo=UTC).timestamp())
        day += dt.timedelta(days=1)
    rules = Rules(daily=14, monthly=6, yearly=1)
    kept = keep.keep(times, rules, tz, dt.datetime(2016, 1, 1, tzinfo=UTC).timestamp())
    daily = [f"2015-12-{d:02}" for d in (31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 18, 17)]
    monthly = ["2015-11-30", "2015-10-31", "2015-09-30", "2015-08-31", "2015-07-31", "2015-06-30"]
    assert kept == {**{d: ("daily", n) for n, d in enumerate(daily, 1)},
                    **{d: ("monthly", n) for n, d in enumerate(monthly, 1)},
                    "2015-01-01": ("yearly[oldest]", 1)}


def test_a_zone_moves_the_day_boundary() -> None:
    """Two snapshots 23:30 and 00:30 UTC apart are one Berlin day in winter
    (00:30 and 01:30 local) but two UTC days: keep_daily=2 keeps one more in UTC."""
    times = {"a": int(dt.datetime(2024, 1, 9, 23, 30, tzinfo=UTC).timestamp()),
             "b": int(dt.datetime(2024, 1, 10, 0, 30, tzinfo=UTC).timestamp()),
             "c": int(dt.datetime(2024, 1, 8, 12, 0, tzinfo=UTC).timestamp())}
    rules = Rules(daily=2)
    now = times["b"] + 60
    assert keep.keep(times, rules, zoneinfo.ZoneInfo("UTC"), now) == {
        "b": ("daily", 1), "a": ("daily", 2)}
    assert keep.keep(times, rules, zoneinfo.ZoneInfo("Europe/Berlin"), now) == {
        "b": ("daily", 1), "c": ("daily", 2)}


def test_iso_weeks() -> None:
    """Weeks are ISO weeks: Sunday 2023-01-01 belongs to 2022-W52 with the
    Saturday before it, Monday 2023-01-02 starts a new week."""
    day = lambda d: int(dt.datetime(2022, 12, 31, 12, tzinfo=UTC).timestamp()) + d * 86400  # noqa: E731
    times = {"sat": day(0), "sun": day(1), "mon": day(2)}
    kept = keep.keep(times, Rules(weekly=3), zoneinfo.ZoneInfo("UTC"), day(3))
    assert kept == {"mon": ("weekly", 1), "sun": ("weekly", 2), "sat": ("weekly[oldest]", 3)}


# -- settings ----------------------------------------------------------------------

def test_rules_per_name_override_rule_by_rule() -> None:
    """A name's entry in `keep` overrides the global rules it names and
    inherits the others; a file's tables and the environment's text agree."""
    env = {"BAKGRAB_KEEP_DAILY": "7", "BAKGRAB_KEEP_WEEKLY": "4",
           "BAKGRAB_KEEP": "db:daily=30,within=2d;web1:keep_weekly=0"}
    s = config.load({}, environ=env)
    assert keep.rules_for(s, "db") == Rules(daily=30, weekly=4, within=2 * 86400.0,
                                            within_text="2d")
    assert keep.rules_for(s, "web1") == Rules(daily=7)
    assert keep.rules_for(s, "other") == Rules(daily=7, weekly=4)
    assert not keep.rules_for(config.Settings(), "x").configured


def test_keep_tables_in_the_config_file(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "b.toml"  # type: ignore[operator]
    path.write_text('[bakgrab]\nkeep_daily = 7\ntimezone = "Europe/Berlin"\n'
                    '[bakgrab.keep.db]\ndaily = 30\nwithin = "2d"\n')
    s = config.load({}, config_file=path, environ={})
    assert s.keep == "db:daily=30,within=2d" and s.timezone == "Europe/Berlin"
    assert keep.rules_for(s, "db").daily == 30


@pytest.mark.parametrize("env", [
    {"BAKGRAB_KEEP_DAILY": "-2"}, {"BAKGRAB_KEEP_WITHIN": "soon"},
    {"BAKGRAB_TIMEZONE": "Mars/Olympus"}, {"BAKGRAB_KEEP": "db:daily=x"},
    {"BAKGRAB_KEEP": "db:fortnightly=3"}, {"BAKGRAB_KEEP": "../x:daily=3"},
    {"BAKGRAB_KEEP": "db:within=forever"},
])
def test_bad_keep_settings_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        config.load({}, environ=env)


def test_simulate_a_known_schedule() -> None:
    """A backup a day for 60 days with keep_daily=7, keep_weekly=4: 7 days,
    then 4 more ISO weeks' Sundays (the newest of each week; last week's
    Sunday is already a daily one), and the 8th day, which no rule keeps
    since today's backup but which only the next grab's expiry removes."""
    now = dt.datetime(2024, 3, 1, 2, 0, tzinfo=UTC).timestamp()  # a Friday
    sim = keep.simulate(60, 86400, Rules(daily=7, weekly=4), zoneinfo.ZoneInfo("UTC"), now)
    ages = [round((now - ts) / 86400) for ts, _, _ in sim.left]
    assert ages == [0, 1, 2, 3, 4, 5, 6, 7, 12, 19, 26, 33]
    assert sim.per_rule() == {"daily": 7, "weekly": 4, "expires at the next grab": 1}
    assert sim.made == 61
    assert [dt.datetime.fromtimestamp(ts, UTC).strftime("%a") for ts, _, _ in sim.left[8:]] == [
        "Sun"] * 4


# -- the free-space queue with protected snapshots (issue 16) ----------------------------

protected_cases = st.tuples(
    st.dictionaries(st.sampled_from("abcde"), st.sets(st.integers(0, 50), min_size=1,
                                                      max_size=6).map(sorted), min_size=1),
    st.dictionaries(st.sampled_from("abcde"), st.integers(0, 100)),
    st.integers(1, 200), st.integers(1, 3), st.sampled_from([None, *"abcde"]),
    st.sets(st.tuples(st.sampled_from("abcde"), st.integers(0, 50))),
    st.booleans(),
)


@HYP
@given(protected_cases)
def test_fair_queue_never_takes_a_protected_snapshot(
        case: tuple[dict[str, list[int]], dict[str, int], int, int, str | None,
                    set[tuple[str, int]], bool]) -> None:
    """For any storage and any protected set: no protected snapshot is ever
    yielded; a name keeps min_keep (protected ones count) unless over its
    share; a name's newest goes only as the last one left (the fair share's
    rule 3), so never while a protected one stays; oldest first; with nothing
    protected, the queue is exactly the one of issue 11."""
    inventory, each, share_bytes, min_keep, current, held, remeasure = case
    protected = {snapshot_dirname(n, t) for n, t in held if t in inventory.get(n, [])}
    per = {n: each.get(n, 5) for n in inventory}
    usages = usages_of(inventory, per)

    def walk(name: str, snaps: object) -> object:
        left = sorted(s.timestamp for s in snaps)  # type: ignore[attr-defined]
        return usages_of({name: left}, per)[name]

    queue = FairQueue(snapshots_of(inventory), usages, Share(share_bytes, None),
                      current=current, min_keep=min_keep, protected=protected,
                      remeasure=walk if remeasure else None)  # type: ignore[arg-type]
    got = order(queue)
    assert not {snapshot_dirname(n, t) for n, t in got} & protected
    within = {n for n in inventory if per[n] * len(inventory[n]) <= share_bytes}
    for name, tss in inventory.items():
        gone = [t for n, t in got if n == name]
        if name in within:
            assert len(tss) - len(gone) >= min(min_keep, len(tss))
        if tss[-1] in gone:  # only as the last one left, never protected
            assert gone == tss and not {snapshot_dirname(name, t) for t in tss} & protected
        assert gone == sorted(gone)  # oldest first
    if not protected:
        plain = FairQueue(snapshots_of(inventory), usages, Share(share_bytes, None),
                          current=current, min_keep=min_keep)
        assert order(plain) == got
