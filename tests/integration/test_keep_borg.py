"""bakgrab's keep rules against the real ``borg prune`` (issue 16).

One borg repository of 32 archives of an empty directory, made at chosen
times with ``borg create --timestamp`` (clustered like real backups, and
around Europe/Berlin's and America/New_York's daylight-saving changes);
``borg prune --dry-run --list`` under several rule sets and time zones (borg
takes its zone from TZ) must keep exactly the archives, with the same rule
and number, that :func:`bakgrab.worker.keep.keep` keeps.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import re
import shutil
import subprocess
import time
import zoneinfo
from collections.abc import Iterator
from pathlib import Path

import pytest

from bakgrab.worker import keep
from bakgrab.worker.keep import Rules

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("borg") is None,
                                 reason="borg not installed (deploy/install-deps.sh --test)")]

UTC = dt.UTC
HOUR, DAY = 3600, 86400


def borg_env(base: Path, tz: str = "UTC") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BORG_", "BAKGRAB_"))}
    env.update({"BORG_BASE_DIR": str(base), "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes", "BORG_PASSPHRASE": "", "TZ": tz})
    return env


def borg(base: Path, *args: str, tz: str = "UTC") -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["borg", *args], capture_output=True, text=True, timeout=120,
                          env=borg_env(base, tz))
    assert done.returncode == 0, (args, done.stderr)
    return done


def schedule(now: int) -> dict[str, int]:
    """32 archive times: the last days hourly-ish, weeks daily-ish, months
    sparse, and runs across two daylight-saving changes; none within 2 hours
    of a ``within`` boundary used below (borg's clock and ours differ)."""
    rng = random.Random(16)
    times = [now - HOUR * k - rng.randint(60, 900) for k in (1, 2, 3, 5, 9, 20, 26)]
    times += [now - DAY * k - rng.randint(0, 20 * HOUR) for k in (2, 3, 4, 6, 9, 11, 15, 23, 30)]
    times += [now - DAY * k - rng.randint(0, 20 * HOUR) for k in (45, 70, 100, 160, 300, 420)]
    # Berlin's 2024-10-27 change (01:00 UTC: 03:00 CEST becomes 02:00 CET) and
    # New York's 2024-03-10 one (07:00 UTC: 02:00 EST becomes 03:00 EDT)
    berlin = int(dt.datetime(2024, 10, 27, 1, tzinfo=UTC).timestamp())
    york = int(dt.datetime(2024, 3, 10, 7, tzinfo=UTC).timestamp())
    times += [berlin + d for d in (-3000, -1500, -60, 60, 1500, 3000, 3700)]
    times += [york + d for d in (-2000, -100, 100, 2000, 3700)]
    times = [t for t in times if not any(abs(t - (now - w)) < 2 * HOUR for w in (2 * DAY, 10 * DAY))]
    return {f"a{i:02}": t for i, t in enumerate(sorted(set(times)))}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, dict[str, int]]]:
    base = tmp_path_factory.mktemp("borg")
    repo, empty = base / "repo", base / "empty"
    empty.mkdir()
    borg(base, "init", "--encryption=none", str(repo))
    times = schedule(int(time.time()))
    for name, ts in times.items():
        stamp = dt.datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        borg(base, "create", "--timestamp", stamp, f"{repo}::{name}", str(empty))
    yield base, repo, times


LINE = re.compile(r"^(?:Keeping archive \(rule: (?P<rule>[a-z\[\]]+) #(?P<n>\d+)\):|"
                  r"(?P<pruned>Would prune:))\s+(?P<name>a\d\d)\s")


def borg_kept(base: Path, repo: Path, args: list[str], tz: str) -> tuple[dict[str, tuple[str, int]],
                                                                         set[str]]:
    done = borg(base, "prune", "--dry-run", "--list", *args, str(repo), tz=tz)
    kept, pruned = {}, set()
    for line in done.stderr.splitlines():
        m = LINE.match(line)
        if m and m["pruned"]:
            pruned.add(m["name"])
        elif m:
            rule = m["rule"].replace("secondly", "last")
            kept[m["name"]] = (rule, int(m["n"]))
    return kept, pruned


CASES = [
    (Rules(daily=7, weekly=4, monthly=6), "UTC"),
    (Rules(daily=7, weekly=4, monthly=6), "Europe/Berlin"),
    (Rules(hourly=6, daily=3, weekly=-1), "Europe/Berlin"),
    (Rules(hourly=30, daily=5, yearly=2), "America/New_York"),
    (Rules(within=2 * DAY, within_text="2d", last=3, monthly=4), "Asia/Kolkata"),
    (Rules(within=10 * DAY, within_text="10d", weekly=2, monthly=-1, yearly=5),
     "Australia/Lord_Howe"),
    (Rules(daily=40), "Pacific/Chatham"),
]


def borg_args(rules: Rules) -> list[str]:
    args = [f"--keep-within={rules.within_text.removesuffix('d')}d"] if rules.within else []
    borg_name = {"last": "last", "hourly": "hourly", "daily": "daily", "weekly": "weekly",
                 "monthly": "monthly", "yearly": "yearly"}
    return args + [f"--keep-{borg_name[r]}={getattr(rules, r)}" for r in borg_name
                   if getattr(rules, r)]


@pytest.mark.parametrize("rules, zone", CASES, ids=[f"{r.describe()}@{z}" for r, z in CASES])
def test_same_archives_kept_as_borg_prune(repository: tuple[Path, Path, dict[str, int]],
                                          rules: Rules, zone: str) -> None:
    """Every archive borg keeps we keep, by the same rule and number; every
    one it would prune we expire; and the rule sets differ in outcome."""
    base, repo, times = repository
    theirs, pruned = borg_kept(base, repo, borg_args(rules), zone)
    ours = keep.keep(times, rules, zoneinfo.ZoneInfo(zone), time.time())
    assert set(theirs) | pruned == set(times)  # borg listed every archive
    assert ours == theirs
    assert pruned == set(times) - set(ours) and pruned  # each case prunes something
