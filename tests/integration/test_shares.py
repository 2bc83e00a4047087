"""Fair shares on a real, small filesystem filled by real grabs (issue 11,
attack 4): a client that fills the storage pays for it alone; a name within
its share keeps its snapshots and its backups succeed. Also: max_names, and
names that look like bakgrab's internal files (attack 8)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bakgrab.worker import locks
from bakgrab.worker.storage import Storage
from tests import support
from tests.integration.test_retention import free_bytes, small_fs

pytestmark = [pytest.mark.integration, pytest.mark.root]

MB = 1 << 20


def grab(redis_url: str, src: Path, name: str, size: int) -> dict[str, object]:
    """One real backup of ``name`` holding ``size`` new bytes; its result."""
    src.mkdir(parents=True, exist_ok=True)
    (src / "data").write_bytes(os.urandom(size))
    done = support.run_backup(redis_url, name, src, "--json")
    assert done.returncode == 0, f"{name}: {done.stderr}"
    time.sleep(1.05)  # distinct UNIXTIME per snapshot
    result: dict[str, object] = json.loads(done.stdout)
    return result


def names_of(storage: Path, name: str) -> list[str]:
    return [p.name for p in support.snapshots(storage, name)]


@pytest.fixture
def full(tmp_path: Path, redis_url: str) -> Iterator[tuple[Path, support.Proc]]:
    """A 40 MiB tmpfs as STORAGE; a worker keeping 10 MiB free and min_keep 2,
    with the default (auto) shares: 20 MiB for each of two names."""
    with small_fs(tmp_path / "storage", "40m") as storage:
        worker = support.start_worker(storage, redis_url, tmp_path / "worker.log",
                                      env=support.worker_env(min_free_abs="10M", min_keep="2"))
        try:
            yield storage, worker
        finally:
            worker.stop()


def test_attacker_filling_the_disk_pays_alone(tmp_path: Path, redis_url: str, full) -> None:  # type: ignore[no-untyped-def]
    """The victim (4 small snapshots, within its share) backs up while an
    attacker with 2 huge snapshots (over its share, at min_keep) fills the
    disk: the classic rule would take the victim's snapshots and still fail;
    with shares the attacker's oldest go, in order, the victim keeps every
    snapshot and each of its backups succeeds."""
    storage, worker = full
    victim, attacker = tmp_path / "src" / "victim", tmp_path / "src" / "attacker"
    for _ in range(4):
        grab(redis_url, victim, "victim", MB)
    mine = names_of(storage, "victim")
    theirs = [grab(redis_url, attacker, "attacker", 14 * MB)["snapshot"] for _ in range(2)]
    assert free_bytes(storage) < 10 * MB  # the victim's next grab needs room

    # what the classic rule would do here: the name with the most snapshots pays
    classic = subprocess.run(
        [support.BAKGRAB, "prune", "--storage", str(storage), "--json", "--dry-run",
         "--min-free-abs", "10M", "--min-keep", "2", "--name-max-bytes", "off",
         "--name-max-inodes", "off"], capture_output=True, text=True, timeout=120)
    would = [e["snapshot"] for e in json.loads(classic.stdout)["removed"]]
    assert would[:2] == mine[:2] and would[-1] is None

    first = grab(redis_url, victim, "victim", MB)
    assert [e["snapshot"] for e in first["removed"]] == [theirs[0]]  # type: ignore[index]
    assert "attacker is over its share" in first["removed"][0]["rule"]  # type: ignore[index]
    theirs.append(grab(redis_url, attacker, "attacker", 14 * MB)["snapshot"])
    assert free_bytes(storage) < 10 * MB
    second = grab(redis_url, victim, "victim", MB)
    assert [e["snapshot"] for e in second["removed"]] == [theirs[1]]  # type: ignore[index]

    assert names_of(storage, "victim") == mine + [first["snapshot"], second["snapshot"]]
    assert names_of(storage, "attacker") == [theirs[2]]
    assert f"removed snapshot {theirs[0]}" in worker.text()


def test_a_grab_over_its_share_takes_only_from_itself(tmp_path: Path, redis_url: str,
                                                      full) -> None:  # type: ignore[no-untyped-def]
    """The attacker's own grab on a full disk, over its share: its own oldest
    goes (below min_keep), never the victim's; the victim's next backup then
    still succeeds without removing anything of its own."""
    storage, _ = full
    victim, attacker = tmp_path / "src" / "victim", tmp_path / "src" / "attacker"
    for _ in range(3):
        grab(redis_url, victim, "victim", MB)
    mine = names_of(storage, "victim")
    theirs = [grab(redis_url, attacker, "attacker", 14 * MB)["snapshot"] for _ in range(2)]
    assert free_bytes(storage) < 10 * MB
    third = grab(redis_url, attacker, "attacker", MB)
    assert [e["snapshot"] for e in third["removed"]] == [theirs[0]]  # type: ignore[index]
    assert "it alone pays" in third["removed"][0]["rule"]  # type: ignore[index]
    assert names_of(storage, "victim") == mine
    grab(redis_url, victim, "victim", MB)
    assert names_of(storage, "victim")[:3] == mine


def test_max_names_refuses_a_new_name_before_writing(tmp_path: Path, redis_url: str) -> None:
    """With max_names = 2 and two names stored, a third name's backup is
    refused (exit 4) with a message naming max_names, leaves no file of that
    name (lock, pin, in-progress dir, failure record, snapshot) nor any other
    file (the check comes before the request's signature check and its
    record), and the known names still back up."""
    with small_fs(tmp_path / "storage", "40m") as storage:
        worker = support.start_worker(storage, redis_url, tmp_path / "worker.log",
                                      env=support.worker_env(max_names="2"))
        try:
            for name in ("one", "two"):
                grab(redis_url, tmp_path / "src" / name, name, 1000)
            before = support.tree_state(storage)
            src = tmp_path / "src" / "three"
            src.mkdir(parents=True)
            done = support.run_backup(redis_url, "three", src)
            assert done.returncode == 4, done.stderr
            assert "max_names=2" in done.stderr
            # nothing written: no path added, none changed (issue 13: not names alone)
            assert support.tree_state(storage) == before
            grab(redis_url, tmp_path / "src" / "one", "one", 1000)
        finally:
            worker.stop()


INTERNAL_LOOKING = ["storage", "trash", "run", "jobs"]


def test_internal_looking_names_do_not_interfere(tmp_path: Path, redis_url: str) -> None:
    """Names `storage`, `trash`, `run`, `jobs` back up like any other; and
    while a grab of each holds its real name lock, another name's grab (whose
    cleanup takes the storage lock) succeeds at once, not after an hour."""
    with small_fs(tmp_path / "storage", "40m") as storage:
        worker = support.start_worker(storage, redis_url, tmp_path / "worker.log")
        try:
            made = {n: grab(redis_url, tmp_path / "src" / n, n, 1000)["snapshot"]
                    for n in INTERNAL_LOOKING}
            store = Storage(storage)
            for name in INTERNAL_LOOKING:
                with locks.held(store.lock(name)):
                    started = time.monotonic()
                    grab(redis_url, tmp_path / "src" / "other", "other", 1000)
                    assert time.monotonic() - started < 60
            for name, snapshot in made.items():
                assert names_of(storage, name) == [snapshot]
            assert len(names_of(storage, "other")) == len(INTERNAL_LOOKING)
            assert (storage / ".bakgrab" / "locks" / "names" / "storage.lock").is_file()
            # the storage-wide lock is never a name's lock file
            assert not locks.is_held(store.storage_lock)
        finally:
            worker.stop()
