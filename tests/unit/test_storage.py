"""bakgrab.worker.storage: snapshot names, the inventory of a real storage dir, atomic writes."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bakgrab.tasks.request import NAME_RE
from bakgrab.worker.storage import Snapshot, Storage, parse_snapshot, snapshot_dirname, write_atomic

HYP = settings(database=None, deadline=None, max_examples=200)

T0 = 1704067200  # 2024-01-01T00:00:00Z


@pytest.fixture
def far_east_tz(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time 14 hours ahead of UTC, so a local date would differ."""
    monkeypatch.setenv("TZ", "Etc/GMT-14")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_dirname_uses_the_utc_date(far_east_tz: None) -> None:
    """The date in a snapshot name is the UTC date of its timestamp, whatever
    the local time zone says."""
    assert time.strftime("%Y-%m-%d", time.localtime(T0 - 1)) == "2024-01-01"
    assert snapshot_dirname("host", T0 - 1) == "host.2023-12-31.1704067199"
    assert snapshot_dirname("host", T0) == "host.2024-01-01.1704067200"
    assert snapshot_dirname("host.example.com", 0) == "host.example.com.1970-01-01.0"


def test_parse_name_with_dots() -> None:
    """A name with dots, even one that looks like a snapshot suffix, parses back."""
    assert parse_snapshot("host.example.com.2024-01-01.1704067200") == Snapshot(
        T0, "host.example.com", "host.example.com.2024-01-01.1704067200"
    )
    odd = snapshot_dirname("a.2024-01-01.5", T0)
    assert parse_snapshot(odd) == Snapshot(T0, "a.2024-01-01.5", odd)


@pytest.mark.parametrize(
    "dirname",
    [
        ".host.2024-01-01.1704067200",
        ".bakgrab",
        "host",
        "host.2024-01-01",
        "host.2024-01-01.",
        "host.2024-1-01.1704067200",
        "host.2024-01-01.17040672x",
        "host.2024-01-01.-5",
        ".2024-01-01.1704067200",
        "host.2024-01-01.1704067200.tmp",
    ],
)
def test_parse_refuses_non_snapshots(dirname: str) -> None:
    """Dot-names, state dirs and malformed names are not snapshots."""
    assert parse_snapshot(dirname) is None


@pytest.mark.parametrize(
    "dirname", ["host.2024-01-01.1704067200\n", "host.2024-01-01.1704067200\n\n"]
)
def test_parse_refuses_trailing_newline(dirname: str) -> None:
    """A directory whose name ends in a newline is not a snapshot."""
    assert parse_snapshot(dirname) is None


@HYP
@given(st.from_regex(NAME_RE, fullmatch=True), st.integers(0, 2**33))
def test_dirname_round_trips(name: str, timestamp: int) -> None:
    """Every valid name and timestamp parse back from their dirname."""
    dirname = snapshot_dirname(name, timestamp)
    assert parse_snapshot(dirname) == Snapshot(timestamp, name, dirname)
    assert parse_snapshot(dirname).date == dirname.split(".")[-2]  # type: ignore[union-attr]


def make_snapshot(root: Path, name: str, timestamp: int) -> str:
    dirname = snapshot_dirname(name, timestamp)
    (root / dirname).mkdir()
    return dirname


@pytest.fixture
def populated(tmp_path: Path) -> Storage:
    """A storage holding snapshots of host, host2 and host.example.com, and
    things that only look like snapshots."""
    root = tmp_path / "storage"
    root.mkdir()
    storage = Storage(root).prepare()
    for name, ts in [("host", T0 + 86400), ("host", T0), ("host", 99), ("host", 100),
                     ("host2", T0 + 5), ("host.example.com", T0 + 7)]:
        make_snapshot(root, name, ts)
    (root / ".host.2024-01-05.1704412800").mkdir()  # a dot-dir
    (root / snapshot_dirname("host", T0 + 3 * 86400)).write_text("a file")
    (root / snapshot_dirname("host", T0 + 4 * 86400)).symlink_to(root / snapshot_dirname(
        "host", T0))
    (root / snapshot_dirname("host", T0 + 5 * 86400)).symlink_to(root / "nowhere")
    (root / "host.2024-01-09.x").mkdir()
    (root / "lost+found").mkdir()
    (storage.inprogress("host")).mkdir()
    return storage


def test_snapshots_of_one_name_oldest_first(populated: Storage) -> None:
    """snapshots(name) lists only real snapshot directories of that name, oldest
    first by timestamp (numerically), never host2's or host.example.com's, nor
    files, symlinks or dot-dirs named like snapshots."""
    assert [s.dirname for s in populated.snapshots("host")] == [
        "host.1970-01-01.99",
        "host.1970-01-01.100",
        "host.2024-01-01.1704067200",
        "host.2024-01-02.1704153600",
    ]
    assert [s.name for s in populated.snapshots("host2")] == ["host2"]
    assert populated.snapshots("hos") == []
    assert populated.snapshots("nobody") == []


def test_by_name_groups_every_name(populated: Storage) -> None:
    """by_name() gives every name with its snapshots, oldest first."""
    inventory = populated.by_name()
    assert sorted(inventory) == ["host", "host.example.com", "host2"]
    assert [s.timestamp for s in inventory["host"]] == [99, 100, T0, T0 + 86400]
    assert [s.dirname for s in inventory["host.example.com"]] == [
        "host.example.com.2024-01-01.1704067207"
    ]


def test_newest(populated: Storage) -> None:
    """newest() is the latest complete snapshot of a name, or None."""
    newest = populated.newest("host")
    assert newest is not None and newest.dirname == "host.2024-01-02.1704153600"
    assert populated.newest("host2").timestamp == T0 + 5  # type: ignore[union-attr]
    assert populated.newest("nobody") is None


def test_next_dirname_skips_taken_names(populated: Storage) -> None:
    """next_dirname() is the plain dirname when free, else the next free second."""
    assert populated.next_dirname("new", T0) == "new.2024-01-01.1704067200"
    assert populated.next_dirname("host", T0) == "host.2024-01-01.1704067201"
    make_snapshot(populated.root, "host", T0 + 1)
    assert populated.next_dirname("host", T0) == "host.2024-01-01.1704067202"
    # a plain file of that name takes it too
    assert populated.next_dirname("host", T0 + 3 * 86400) == "host.2024-01-04.1704326401"


def test_next_dirname_skips_dangling_symlink(populated: Storage) -> None:
    """A dangling symlink also takes a dirname."""
    taken = snapshot_dirname("host", T0 + 5 * 86400)
    assert os.path.lexists(populated.root / taken)
    assert not (populated.root / taken).exists()  # the fixture's symlink dangles
    assert populated.next_dirname("host", T0 + 5 * 86400) == snapshot_dirname(
        "host", T0 + 5 * 86400 + 1)


def test_prepare_makes_private_state_dirs(tmp_path: Path) -> None:
    """prepare() creates .bakgrab and its subdirs 0700, and refuses a missing storage."""
    storage = Storage(tmp_path).prepare()
    for sub in ("", "inprogress", "meta", "pins", "locks", "locks/names", "usage", "jobs",
                "pulls", "run", "trash"):
        mode = stat.S_IMODE((storage.state / sub).stat().st_mode)
        assert mode == 0o700, sub
    assert storage.snapshots() == []
    with pytest.raises(FileNotFoundError):
        Storage(tmp_path / "missing").prepare()


@pytest.mark.parametrize("name", ["storage", "trash", "names", "run", "jobs", "usage"])
def test_name_locks_never_are_internal_files(tmp_path: Path, name: str) -> None:
    """A backup name's lock lives in its own namespace: no name maps to the
    storage-wide locks or to any other internal path (issue 11, attack 8)."""
    storage = Storage(tmp_path).prepare()
    internal = {storage.storage_lock, storage.trash_lock, storage.request_key}
    internal |= {storage.state / sub for sub in os.listdir(storage.state)}
    assert storage.lock(name) not in internal
    assert storage.lock(name).parent == storage.state / "locks" / "names"


# -- write_atomic ----------------------------------------------------------------


def test_write_atomic_writes_bytes_and_mode(tmp_path: Path) -> None:
    """write_atomic leaves exactly the data, with the mode asked for (0600 by
    default), and no temporary file."""
    tmp_path = tmp_path / "dir"
    tmp_path.mkdir()
    write_atomic(tmp_path / "a.json", '{"ok": true}')
    write_atomic(tmp_path / "b.bin", b"\x00\xff", mode=0o640)
    assert (tmp_path / "a.json").read_bytes() == b'{"ok": true}'
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o640 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_atomic_replaces_by_rename(tmp_path: Path) -> None:
    """An existing file is replaced by a new inode (readers holding the old one
    keep reading it whole), not rewritten in place."""
    path = tmp_path / "pin.pub"
    path.write_text("old contents\n")
    with open(path) as reader:
        old_inode = os.fstat(reader.fileno()).st_ino
        write_atomic(path, "new\n")
        assert reader.read() == "old contents\n"
    assert path.read_text() == "new\n"
    assert path.stat().st_ino != old_inode


def test_write_atomic_replaces_a_symlink_not_its_target(tmp_path: Path) -> None:
    """A symlink at the path is replaced; the file it pointed to is untouched."""
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    link = tmp_path / "meta.json"
    link.symlink_to(target)
    write_atomic(link, "{}")
    assert not link.is_symlink()
    assert link.read_text() == "{}"
    assert target.read_text() == "precious"


def test_write_atomic_does_not_follow_a_planted_temp_symlink(tmp_path: Path) -> None:
    """A symlink planted at the temporary name is removed as a leftover, never
    followed: its target keeps its contents and the file is written in place."""
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    planted = tmp_path / f".x.json.tmp{os.getpid()}"
    planted.symlink_to(target)
    write_atomic(tmp_path / "x.json", "{}")
    assert target.read_text() == "precious"
    assert not (tmp_path / "x.json").is_symlink()
    assert (tmp_path / "x.json").read_text() == "{}"
    assert not os.path.lexists(planted)


def test_write_atomic_opens_its_temp_file_exclusively(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The temporary file is opened with O_EXCL and O_NOFOLLOW: should anything
    appear at its name between the unlink and the open, the open fails rather
    than write through it."""
    flags_seen: list[int] = []
    real_open = os.open

    def spy(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        flags_seen.append(flags)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    write_atomic(tmp_path / "x.json", "{}")
    assert flags_seen, "write_atomic did not go through os.open"
    assert flags_seen[0] & os.O_EXCL and flags_seen[0] & os.O_NOFOLLOW


def test_write_atomic_mode_despite_stale_temp_file(tmp_path: Path) -> None:
    """The mode asked for holds even if a stale temp file of that name exists."""
    stale = tmp_path / f".x.json.tmp{os.getpid()}"
    stale.write_text("half")
    stale.chmod(0o644)
    write_atomic(tmp_path / "x.json", "{}", mode=0o600)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o600


# -- job records (issue 13) ---------------------------------------------------------


def test_job_records_live_as_long_as_results(tmp_path: Path) -> None:
    """sweep_job_records() removes job records older than the results' lifetime
    (the Celery app's result_expires) and keeps younger ones and other files."""
    from bakgrab.tasks.app import RESULT_EXPIRES, make_app
    from bakgrab.tasks.config import Settings
    from bakgrab.worker.grab import sweep_job_records

    assert make_app(Settings(), broker="memory://").conf.result_expires == RESULT_EXPIRES
    storage = Storage(tmp_path).prepare()
    now = T0 + 30 * 86400
    ages = {"old-one": RESULT_EXPIRES + 1, "young-one": RESULT_EXPIRES - 60, "new": 0}
    for task_id, age in ages.items():
        storage.job(task_id).write_text("{}")
        os.utime(storage.job(task_id), (now - age, now - age))
    others = [storage.jobs / "notes.txt", storage.jobs / ".x.json.tmp1"]
    for path in others:
        path.write_text("x")
        os.utime(path, (now - 2 * RESULT_EXPIRES, now - 2 * RESULT_EXPIRES))
    sweep_job_records(storage, now=now)
    assert sorted(p.name for p in storage.jobs.iterdir()) == sorted(
        [".x.json.tmp1", "new.json", "notes.txt", "young-one.json"])
