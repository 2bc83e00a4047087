"""Keep rules, protected snapshots and the simulator on real storage (issue 16).

Histories are imported: directories of the layout ``NAME.YYYY-mm-dd.UNIXTIME``
made by hand, as an operator bringing over rsnapshot's history would (the
README says how); grabs are real ones through a real worker.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import time
import zoneinfo
from pathlib import Path

import pytest

from bakgrab.tasks.config import Settings
from bakgrab.worker import keep, retention
from bakgrab.worker.keep import Rules
from bakgrab.worker.storage import Storage, snapshot_dirname
from tests import support
from tests.integration.test_retention import free_bytes, small_fs, tree_state

pytestmark = pytest.mark.integration

MB = 1 << 20
DAY = 86400


def imported(storage: Path, name: str, timestamp: int, size: int = 0) -> str:
    """One snapshot made by other means: a directory of the layout holding
    ``size`` random bytes no other snapshot shares."""
    dirname = snapshot_dirname(name, timestamp)
    (storage / dirname / "etc").mkdir(parents=True)
    (storage / dirname / "etc" / "hostname").write_text(f"{name}\n")
    if size:
        (storage / dirname / "data").write_bytes(os.urandom(size))
    return dirname


def bakgrab(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([support.BAKGRAB, *args], capture_output=True, text=True, timeout=120,
                          env=env or support.worker_env())


def snapshots(storage: Path, name: str | None = None) -> list[str]:
    return sorted(p.name for p in storage.iterdir()
                  if not p.name.startswith(".") and (name is None or p.name.startswith(name + ".")))


def test_prune_expires_what_no_rule_keeps(tmp_path: Path) -> None:
    """An imported history of 20 daily snapshots per name, pruned with
    --keep-last 3 --keep-daily 5: the three newest, then five more days (the
    days of the three newest are not counted again), so days 0 to 7 stay. A
    name's own `keep` entry overrides rule by rule (db: last=2, daily 5
    inherited: days 0 to 6). --dry-run lists exactly that and changes nothing;
    prune then removes exactly those, each with its rule."""
    storage = tmp_path / "storage"
    storage.mkdir()
    now = int(time.time())
    made = {n: [imported(storage, n, now - k * DAY) for k in range(20)] for n in ("web", "db")}
    env = support.worker_env(keep="db:last=2")
    rules = ("--keep-last", "3", "--keep-daily", "5")
    # a prune without rules removes nothing here, and makes its lock files
    assert json.loads(bakgrab("prune", "--storage", str(storage), "--json").stdout)[
        "removed"] == []
    before = tree_state(storage, (".bakgrab/usage",))
    dry = bakgrab("prune", "--storage", str(storage), "--dry-run", "--json", *rules, env=env)
    assert dry.returncode == 0, dry.stderr
    expect = sorted(made["db"][7:] + made["web"][8:])
    planned = json.loads(dry.stdout)["removed"]
    assert sorted(e["snapshot"] for e in planned) == expect
    assert {e["rule"] for e in planned} == {"expired"}
    assert "keep_last=2, keep_daily=5" in next(e["reason"] for e in planned
                                                if e["snapshot"].startswith("db."))
    assert tree_state(storage, (".bakgrab/usage",)) == before
    done = bakgrab("prune", "--storage", str(storage), *rules, env=env)
    assert done.returncode == 0, done.stderr
    assert snapshots(storage) == sorted(made["db"][:7] + made["web"][:8])
    for dirname in expect:
        assert f"removed {dirname}: no keep rule keeps it" in done.stdout
    again = bakgrab("prune", "--storage", str(storage), "--json", *rules, env=env)
    assert json.loads(again.stdout)["removed"] == []


def test_without_keep_rules_nothing_expires(tmp_path: Path) -> None:
    """No keep rule set: prune with room to spare removes nothing at all,
    however old (the free-space rule alone, as before issue 16)."""
    storage = tmp_path / "storage"
    storage.mkdir()
    now = int(time.time())
    made = [imported(storage, "old", now - k * 400 * DAY) for k in range(5)]
    done = bakgrab("prune", "--storage", str(storage), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["removed"] == []
    assert snapshots(storage) == sorted(made)


def test_a_protected_snapshot_survives_expiry_until_unprotected(tmp_path: Path) -> None:
    """`protect` keeps a snapshot no rule keeps through prune; `list` marks it
    with its note; nothing is written inside the snapshot; `unprotect` hands
    it back to the rules. A snapshot that does not exist, or a past --until,
    is refused and nothing is recorded."""
    storage = tmp_path / "storage"
    storage.mkdir()
    now = int(time.time())
    made = [imported(storage, "web", now - k * DAY) for k in range(4)]
    held = made[3]
    inside = tree_state(storage / held)
    S = ("--storage", str(storage))
    done = bakgrab("protect", *S, held, "--note", "before the upgrade", "--until", "2999-01-31")
    assert done.returncode == 0, done.stderr
    assert f"{held}: protected until 2999-02-01T00:00" in done.stdout
    assert (storage / ".bakgrab" / "protected" / f"{held}.json").is_file()
    assert tree_state(storage / held) == inside
    pruned = bakgrab("prune", *S, "--keep-last", "1", "--json")
    assert pruned.returncode == 0, pruned.stderr
    assert sorted(e["snapshot"] for e in json.loads(pruned.stdout)["removed"]) == sorted(made[1:3])
    assert snapshots(storage) == sorted([made[0], held])
    listed = json.loads(bakgrab("list", *S, "--json").stdout)[0]["snapshots"]
    marks = {s["snapshot"]: s["protected"] for s in listed}
    assert marks[made[0]] is None
    assert marks[held]["note"] == "before the upgrade" and marks[held]["active"] is True
    assert "protected until 2999-" in bakgrab("list", *S, "--fast").stdout
    for bad, code in ((["protect", *S, "web.2020-01-01.1577836800"], 2),
                      (["protect", *S, made[0], "--until", "2001-01-01"], 3),
                      (["protect", *S, "../etc"], 2)):
        refused = bakgrab(*bad)
        assert refused.returncode == code, (bad, refused.stdout, refused.stderr)
        assert "Traceback" not in refused.stderr
    assert sorted(os.listdir(storage / ".bakgrab" / "protected")) == [f"{held}.json"]
    done = bakgrab("unprotect", *S, held)
    assert done.returncode == 0 and "protection removed" in done.stdout
    pruned = bakgrab("prune", *S, "--keep-last", "1", "--json")
    assert [e["snapshot"] for e in json.loads(pruned.stdout)["removed"]] == [held]
    assert snapshots(storage) == [made[0]]


def test_a_lapsed_protection_protects_nothing(tmp_path: Path) -> None:
    """A protection whose --until has passed no longer holds its snapshot
    (the record is dropped when the snapshot goes)."""
    storage = tmp_path / "storage"
    storage.mkdir()
    now = int(time.time())
    made = [imported(storage, "web", now - k * DAY) for k in range(2)]
    done = bakgrab("protect", "--storage", str(storage), made[1], "--until",
                   dt.datetime.fromtimestamp(now + 2, dt.UTC).isoformat())
    assert done.returncode == 0, done.stderr
    held = bakgrab("prune", "--storage", str(storage), "--keep-last", "1", "--json")
    assert json.loads(held.stdout)["removed"] == []
    time.sleep(max(0.0, now + 3 - time.time()))
    lapsed = bakgrab("prune", "--storage", str(storage), "--keep-last", "1", "--json")
    assert [e["snapshot"] for e in json.loads(lapsed.stdout)["removed"]] == [made[1]]
    assert not (storage / ".bakgrab" / "protected" / f"{made[1]}.json").exists()


def test_combined_order_when_space_is_short(tmp_path: Path, redis_url: str) -> None:
    """A grab of `c` short of space removes first the snapshots no keep rule
    keeps (of `b`, which keeps only its last), oldest first; only then the
    free-space rules among kept ones (`a`, no rules: the classic rule, the
    most snapshots); never the protected `a` snapshot; each removal in the
    grab's result names its rule. The free-space rules alone would have
    taken a1 first (`a` has the most snapshots)."""
    with small_fs(tmp_path / "storage", "40m") as storage:
        now = int(time.time())
        a = [imported(storage, "a", now - (9 - k) * DAY, 3 * MB) for k in range(4)]
        b = [imported(storage, "b", now - (9 - k) * DAY + 60, 3 * MB) for k in range(3)]
        Storage(storage).prepare()
        assert bakgrab("protect", "--storage", str(storage), a[0]).returncode == 0
        need = free_bytes(storage) + 8 * MB
        worker = support.start_worker(storage, redis_url, tmp_path / "w.log",
                                      env=support.worker_env(min_free_abs=str(need),
                                                             keep="b:last=1"))
        try:
            src = tmp_path / "src"
            src.mkdir()
            (src / "f").write_text("c\n")
            done = support.run_backup(redis_url, "c", src, "--json")
        finally:
            worker.stop()
        assert done.returncode == 0, done.stderr
        removed = json.loads(done.stdout)["removed"]
        assert [e["snapshot"] for e in removed] == [b[0], b[1], a[1]]
        assert removed[0]["rule"].startswith("no keep rule keeps it")
        assert removed[1]["rule"].startswith("no keep rule keeps it")
        assert removed[2]["rule"] == "a has the most snapshots; its oldest goes first"
        assert snapshots(storage, "a") == [a[0], a[2], a[3]]
        assert snapshots(storage, "b") == [b[2]]
        assert free_bytes(storage) >= need - 2 * MB  # the grab of c itself used a little


def test_protections_that_block_cleanup_fail_the_grab_naming_them(
        tmp_path: Path, redis_url: str) -> None:
    """When only protected snapshots could free the space, the grab fails
    (exit 6), removes nothing, and names each protection and `unprotect`;
    once unprotected, the same grab succeeds by removing it."""
    with small_fs(tmp_path / "storage", "40m") as storage:
        now = int(time.time())
        p = [imported(storage, "p", now - (3 - k) * DAY, 4 * MB) for k in range(3)]
        Storage(storage).prepare()
        for dirname, note in ((p[0], "legal hold 17"), (p[1], "")):
            assert bakgrab("protect", "--storage", str(storage), dirname,
                           "--note", note).returncode == 0
        need = free_bytes(storage) + 3 * MB
        env = support.worker_env(min_free_abs=str(need))
        src = tmp_path / "src"
        src.mkdir()
        (src / "f").write_text("c\n")
        worker = support.start_worker(storage, redis_url, tmp_path / "w1.log", env=env)
        try:
            failed = support.run_backup(redis_url, "c", src, "--json")
            assert failed.returncode == 6, (failed.stdout, failed.stderr)
            text = failed.stdout + failed.stderr
            assert f"{p[0]} (protected: legal hold 17)" in text and f"{p[1]} (protected)" in text
            assert "bakgrab unprotect" in text
            assert snapshots(storage) == p
            assert bakgrab("unprotect", "--storage", str(storage), p[0]).returncode == 0
            done = support.run_backup(redis_url, "c", src, "--json")
        finally:
            worker.stop()
        assert done.returncode == 0, done.stderr
        assert [e["snapshot"] for e in json.loads(done.stdout)["removed"]] == [p[0]]
        assert snapshots(storage, "p") == p[1:]


def test_each_grab_expires_its_own_name_only(tmp_path: Path, redis_url: str) -> None:
    """With keep_last=2, each grab of `g` first expires what the rule no
    longer keeps of `g` (its result says so), and leaves the unkept snapshots
    of other names alone while space is enough."""
    storage = tmp_path / "storage"
    storage.mkdir()
    now = int(time.time())
    other = [imported(storage, "other", now - k * DAY) for k in range(4)]
    worker = support.start_worker(storage, redis_url, tmp_path / "w.log",
                                  env=support.worker_env(keep_last="2"))
    src = tmp_path / "src"
    src.mkdir()
    results = []
    try:
        for i in range(4):
            (src / "f").write_text(f"{i}\n")
            done = support.run_backup(redis_url, "g", src, "--json")
            assert done.returncode == 0, done.stderr
            results.append(json.loads(done.stdout))
            time.sleep(1.05)  # a distinct UNIXTIME per snapshot
    finally:
        worker.stop()
    made = [r["snapshot"] for r in results]
    assert [r["removed"] for r in results[:3]] == [[], [], []]
    assert [(e["snapshot"], e["rule"]) for e in results[3]["removed"]] == [(made[0], "expired")]
    assert snapshots(storage, "g") == sorted(made[1:])
    assert snapshots(storage, "other") == sorted(other)
    assert f"removed snapshot {made[0]}" in worker.text()


def test_the_simulator_matches_real_expiry_on_a_known_schedule(tmp_path: Path) -> None:
    """40 daily imports into a real storage, each followed by the cleanup a
    grab runs (at that grab's time), leave exactly what the simulator
    predicts for 39 days every 1d; in Europe/Berlin with keep_daily=5,
    keep_weekly=2, keep_monthly=2."""
    storage = tmp_path / "storage"
    storage.mkdir()
    store = Storage(storage).prepare()
    settings = Settings(storage=str(storage), keep_daily=5, keep_weekly=2, keep_monthly=2,
                        timezone="Europe/Berlin", min_free_abs="1", min_free_inodes=1)
    end = int(dt.datetime(2024, 4, 2, 5, tzinfo=dt.UTC).timestamp())  # DST began 03-31
    for k in range(39, -1, -1):
        t = end - k * DAY
        retention.make_room(store, settings, current="s", now=t)
        imported(storage, "s", t)
    sim = keep.simulate(39, DAY, Rules(daily=5, weekly=2, monthly=2),
                        zoneinfo.ZoneInfo("Europe/Berlin"), end)
    assert snapshots(storage) == sorted(snapshot_dirname("s", ts) for ts, _, _ in sim.left)
    assert sim.per_rule() == {"daily": 5, "weekly": 2, "monthly": 1, "monthly[oldest]": 1,
                              "expires at the next grab": 1}
    # by hand: 5 days; the week of 03-25 ends on a kept day (not counted), so
    # the Sundays 03-24 and 03-17; March ends on a kept day, so February's
    # last, and with no older month the oldest backup; 03-28 goes next grab
    assert [d.split(".")[1] for d in snapshots(storage)] == [
        "2024-02-23", "2024-02-29", "2024-03-17", "2024-03-24", "2024-03-28", "2024-03-29",
        "2024-03-30", "2024-03-31", "2024-04-01", "2024-04-02"]


def test_simulate_on_the_command_line(tmp_path: Path) -> None:
    """`prune --simulate 60 --keep-daily 7 --keep-weekly 4`: 12 snapshots
    (7 days, the 8th about to expire, 4 Sundays), before any snapshot
    exists (no space); with a storage, the space is the count times its
    average snapshot (1 MiB and a page each here); nothing is removed either way."""
    plain = bakgrab("prune", "--simulate", "60", "--keep-daily", "7", "--keep-weekly", "4",
                    "--json")
    assert plain.returncode == 0, plain.stderr
    data = json.loads(plain.stdout)
    assert data["count"] == 12 and data["space_bytes"] is None and data["backups_made"] == 61
    assert [round(s["age_seconds"] / DAY) for s in data["snapshots"][:8]] == list(range(8))
    weekly = [s for s in data["snapshots"] if s["rule"] == "weekly"]
    assert [dt.datetime.fromisoformat(s["time"]).weekday() for s in weekly] == [6] * 4
    with small_fs(tmp_path / "storage", "20m") as storage:
        now = int(time.time())
        made = [imported(storage, "s", now - k * DAY, MB) for k in range(2)]
        before = tree_state(storage)
        sized = bakgrab("prune", "--storage", str(storage), "--simulate", "60", "--every", "1d",
                        "--keep-daily", "7", "--keep-weekly", "4", "--json")
        assert sized.returncode == 0, sized.stderr
        data = json.loads(sized.stdout)
        # tmpfs: a directory takes no block, etc/hostname one page, data 1 MiB
        each = MB + os.sysconf("SC_PAGE_SIZE")
        assert data["average_snapshot_bytes"] == each and data["space_bytes"] == 12 * each
        text = bakgrab("prune", "--storage", str(storage), "--simulate", "60",
                       "--keep-daily", "7", "--keep-weekly", "4").stdout
        assert "12 snapshot(s) left: daily 7, expires at the next grab 1, weekly 4" in text
        assert "space: 12 x 1.0 MiB" in text
        assert snapshots(storage) == sorted(made)
        skip = (".bakgrab/usage",)
        assert tree_state(storage, skip) == {k: v for k, v in before.items()
                                              if not k.startswith(skip)}


def test_an_imported_history_is_a_history_like_any_other(tmp_path: Path, redis_url: str) -> None:
    """Directories of the layout copied in by hand (the README's import) are
    snapshots: `list` shows them, the keep rules count them, and the first
    grab of the name links its unchanged file to the newest imported copy
    (one inode), not a fresh copy."""
    storage = tmp_path / "storage"
    storage.mkdir()
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(64 << 10))
    os.chmod(src / "big", 0o644)
    os.utime(src / "big", (1700000000, 1700000000))
    now = int(time.time())
    made = []
    for k in (30, 20, 10):  # rsnapshot's daily.2, daily.1, daily.0: cp -al of one another
        dirname = snapshot_dirname("web", now - k * DAY)
        if made:
            subprocess.run(["cp", "-al", str(storage / made[-1]), str(storage / dirname)],
                           check=True)
        else:
            (storage / dirname).mkdir()
            subprocess.run(["cp", "-a", str(src / "big"), str(storage / dirname / "big")],
                           check=True)
        made.append(dirname)
    listed = json.loads(bakgrab("list", "--storage", str(storage), "--json").stdout)
    assert [(n["name"], n["count"]) for n in listed] == [("web", 3)]
    worker = support.start_worker(storage, redis_url, tmp_path / "w.log",
                                  env=support.worker_env(keep_last="3"))
    try:
        done = support.run_backup(redis_url, "web", src, "--json")
    finally:
        worker.stop()
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["removed"] == []  # keep_last=3 kept all three before the grab
    new = storage / result["snapshot"]
    assert os.stat(new / "big").st_ino == os.stat(storage / made[-1] / "big").st_ino
    assert os.stat(new / "big").st_nlink == 4
    pruned = bakgrab("prune", "--storage", str(storage), "--keep-last", "3", "--json")
    assert [e["snapshot"] for e in json.loads(pruned.stdout)["removed"]] == [made[0]]


def test_simulate_one_names_rules(tmp_path: Path) -> None:
    """--simulate --name uses that name's own rules and only its snapshots'
    average size; --every without --simulate is a usage error."""
    with small_fs(tmp_path / "storage", "20m") as storage:
        now = int(time.time())
        imported(storage, "db", now, 2 * MB)
        imported(storage, "web", now, 0)
        env = support.worker_env(keep="db:daily=3", keep_daily="9")
        done = bakgrab("prune", "--storage", str(storage), "--simulate", "10", "--name", "db",
                       "--json", env=env)
        assert done.returncode == 0, done.stderr
        data = json.loads(done.stdout)
        assert data["rules"] == {"daily": 3} and data["count"] == 4
        assert data["average_snapshot_bytes"] == 2 * MB + os.sysconf("SC_PAGE_SIZE")
        everyone = json.loads(bakgrab("prune", "--simulate", "10", "--json", env=env).stdout)
        assert everyone["rules"] == {"daily": 9} and everyone["count"] == 10  # 9 and 1 to go
    wrong = bakgrab("prune", "--storage", str(tmp_path), "--every", "1d")
    assert wrong.returncode == 2 and "go with --simulate" in wrong.stderr
