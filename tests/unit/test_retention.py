"""bakgrab.worker.retention: which snapshots go, in what order, and only as many as needed."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bakgrab.tasks.config import Settings, parse_size
from bakgrab.tasks.errors import InvalidRequest, NoSpace
from bakgrab.worker import locks, retention
from bakgrab.worker.inventory import inventory
from bakgrab.worker.retention import (
    FairQueue,
    NameUsage,
    Need,
    Share,
    Usage,
    admit,
    cached_usage,
    exclusive_usage,
    make_room,
    need,
    removal_queue,
    shares,
    walk_name,
)
from bakgrab.worker.storage import Snapshot, Storage, snapshot_dirname
from tests import support

HYP = settings(database=None, deadline=None, max_examples=300)
needs_ionice = pytest.mark.skipif(shutil.which("ionice") is None, reason="ionice not installed")

T0 = 1704067200
KiB = 1024
GiB = 1 << 30


# -- removal_queue -----------------------------------------------------------------


def reference_queue(inventory: Mapping[str, Sequence[int]], min_keep: int) -> list[tuple[str, int]]:
    """The rule as the design states it, written independently: while some name
    has more than min_keep snapshots, take the name with the most (ties: the
    name sorting last) and remove its oldest."""
    left = {name: sorted(ts) for name, ts in inventory.items()}
    out: list[tuple[str, int]] = []
    while True:
        over = {n: len(ts) for n, ts in left.items() if len(ts) > min_keep}
        if not over:
            return out
        most = max(over.values())
        name = sorted(n for n, count in over.items() if count == most)[-1]
        out.append((name, left[name].pop(0)))


def snapshots_of(inventory: Mapping[str, Sequence[int]]) -> dict[str, list[Snapshot]]:
    # given newest first, so the queue has to sort them itself
    return {
        name: [Snapshot(ts, name, snapshot_dirname(name, ts)) for ts in sorted(tss, reverse=True)]
        for name, tss in inventory.items()
    }


inventories = st.dictionaries(
    st.text("abAB0._-", min_size=1, max_size=3),
    st.sets(st.integers(0, 2**32), max_size=8).map(sorted),
    max_size=6,
)


@HYP
@given(inventories, st.integers(1, 4))
def test_queue_matches_the_design_rule(
    inventory: dict[str, list[int]], min_keep: int
) -> None:
    """removal_queue() yields exactly the reference order: most snapshots first
    (ties: name sorting last), oldest of that name first."""
    got = [(s.name, s.timestamp) for s in removal_queue(snapshots_of(inventory), min_keep)]
    assert got == reference_queue(inventory, min_keep)


@HYP
@given(inventories, st.integers(1, 4))
def test_queue_keeps_min_keep_and_the_newest(
    inventory: dict[str, list[int]], min_keep: int
) -> None:
    """A name never goes below min_keep, its newest snapshot is never in the
    queue, and what goes of a name is its oldest."""
    queue = list(removal_queue(snapshots_of(inventory), min_keep))
    for name, tss in inventory.items():
        gone = [s.timestamp for s in queue if s.name == name]
        assert len(gone) == max(0, len(tss) - min_keep)
        assert gone == tss[: len(gone)]
        if tss:
            assert tss[-1] not in gone


def test_queue_example() -> None:
    """a has 3, b has 3, c has 1: b (sorts last) loses its oldest, then a, ..."""
    inventory = {"a": [1, 2, 3], "b": [10, 20, 30], "c": [5]}
    got = [(s.name, s.timestamp) for s in removal_queue(snapshots_of(inventory), 1)]
    assert got == [("b", 10), ("a", 1), ("b", 20), ("a", 2)]
    got = [(s.name, s.timestamp) for s in removal_queue(snapshots_of(inventory), 2)]
    assert got == [("b", 10), ("a", 1)]


def test_queue_refuses_min_keep_zero() -> None:
    """min_keep below 1 would allow removing a newest snapshot: refused."""
    with pytest.raises(ValueError, match="min_keep"):
        list(removal_queue(snapshots_of({"a": [1, 2]}), 0))


# -- need ----------------------------------------------------------------------------


def usage(free: int = 0, used: int = 0, free_inodes: int = 0, used_inodes: int = 0) -> Usage:
    return Usage(free, used, free_inodes, used_inodes, has_inodes=True)


@pytest.mark.parametrize(
    ("min_free_abs", "avg", "used", "used_inodes", "n", "expected"),
    [
        ("1G", 0.0, 100 * GiB, 10**6, 10, Need(GiB, 10000)),
        ("1G", 1.5, 100 * GiB, 10**6, 10, Need(15 * GiB, 150000)),
        ("1G", 1.5, 100 * GiB, 10**6, 0, Need(GiB, 10000)),
        ("20G", 1.0, 100 * GiB, 10**6, 10, Need(20 * GiB, 100000)),
        ("1G", 0.5, 100 * GiB, 1000, 10, Need(5 * GiB, 10000)),
    ],
)
def test_need_formula(
    min_free_abs: str, avg: float, used: int, used_inodes: int, n: int, expected: Need
) -> None:
    """need = max(min_free_avg * used / snapshots, min_free_abs) for bytes and
    the same with min_free_inodes for inodes; the average term only when
    min_free_avg is set and there are snapshots."""
    s = Settings(min_free_abs=min_free_abs, min_free_avg=avg, min_free_inodes=10000)
    assert need(s, usage(used=used, used_inodes=used_inodes), n) == expected


@HYP
@given(
    st.integers(0, 2**44), st.floats(0, 10), st.integers(0, 2**50), st.integers(0, 2**32),
    st.integers(0, 10**4), st.integers(0, 10**7),
)
def test_need_property(
    abs_bytes: int, avg: float, used: int, used_inodes: int, n: int, min_inodes: int
) -> None:
    """need() follows the formula for any numbers."""
    s = Settings(min_free_abs=str(abs_bytes), min_free_avg=avg, min_free_inodes=min_inodes)
    got = need(s, usage(used=used, used_inodes=used_inodes), n)
    if avg and n:
        assert got.bytes == max(int(avg * used / n), abs_bytes)
        assert got.inodes == max(int(avg * used_inodes / n), min_inodes)
    else:
        assert got == Need(abs_bytes, min_inodes)


def test_short_says_why() -> None:
    """Need.short() names what is short (bytes first, then inodes), or None."""
    wanted = Need(2 * GiB, 100)
    assert wanted.short(usage(free=2 * GiB, free_inodes=100)) is None
    assert wanted.short(usage(free=GiB, free_inodes=100)) == "free space 1.0 GiB < 2.0 GiB"
    assert wanted.short(usage(free=2 * GiB, free_inodes=99)) == "free inodes 99 < 100"
    no_inodes = Usage(2 * GiB, 0, 0, 0, has_inodes=False)
    assert wanted.short(no_inodes) is None


# -- make_room on a real storage dir ---------------------------------------------------


class FakeDisk:
    """A measure() for make_room: free space grows by a snapshot's size once its
    directory is gone from the storage."""

    def __init__(self, storage: Storage, sizes: Mapping[str, int], base_free: int,
                 free_inodes: int = 10**9) -> None:
        self.storage = storage
        self.sizes = dict(sizes)
        self.base_free = base_free
        self.free_inodes = free_inodes
        self.calls = 0

    def __call__(self, path: Path, enough: object = None) -> Usage:
        assert path == self.storage.root
        self.calls += 1
        gone = [d for d in self.sizes if not (self.storage.root / d).exists()]
        free = self.base_free + sum(self.sizes[d] for d in gone)
        used = sum(self.sizes.values()) - sum(self.sizes[d] for d in gone)
        return Usage(free, used, self.free_inodes + len(gone), 1000, has_inodes=True)


@pytest.fixture
def store(tmp_path: Path) -> Storage:
    root = tmp_path / "storage"
    root.mkdir()
    return Storage(root).prepare()


def populate(storage: Storage, inventory: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Real snapshot dirs, each with a file, and a meta record; dirname -> size."""
    sizes = {}
    for name, tss in inventory.items():
        for ts in tss:
            dirname = snapshot_dirname(name, ts)
            (storage.root / dirname / "etc").mkdir(parents=True)
            (storage.root / dirname / "etc" / "data").write_bytes(b"x" * 8 * KiB)
            storage.meta(dirname).write_text("{}")
            storage.meta(dirname, ".exclude").write_text("- /proc\n")
            sizes[dirname] = 100 * KiB
    return sizes


def present(storage: Storage) -> list[str]:
    return sorted(s.dirname for s in storage.snapshots())


INVENTORY = {"alpha": [T0, T0 + 86400, T0 + 2 * 86400], "beta": [T0 + 10, T0 + 86410],
             "gamma": [T0 + 20]}


def settings_for(free_abs: int, min_keep: int = 1, **more: object) -> Settings:
    """Settings for the classic rule (no fair shares) unless ``more`` sets them."""
    more = {"name_max_bytes": "off", "name_max_inodes": "off", **more}
    return Settings(min_free_abs=str(free_abs), min_free_inodes=1000, min_keep=min_keep,
                    **more)  # type: ignore[arg-type]


@needs_ionice
def test_make_room_removes_nothing_when_space_suffices(store: Storage) -> None:
    """With enough free space and inodes, nothing is removed."""
    disk = FakeDisk(store, populate(store, INVENTORY), base_free=10 * GiB)
    before = present(store)
    assert make_room(store, settings_for(GiB), measure=disk) == []
    assert present(store) == before
    assert disk.calls == 1


@needs_ionice
def test_make_room_removes_in_order_until_enough(store: Storage) -> None:
    """Snapshots go in queue order, one at a time, until the need is met; their
    meta records go with them; the rest stays."""
    sizes = populate(store, INVENTORY)
    disk = FakeDisk(store, sizes, base_free=50 * KiB)
    removed = make_room(store, settings_for(250 * KiB), measure=disk)
    gone = [snapshot_dirname("alpha", T0), snapshot_dirname("beta", T0 + 10)]
    assert [r["snapshot"] for r in removed] == gone
    assert removed[0]["reason"] == "free space 50.0 KiB < 250.0 KiB"
    assert removed[1]["reason"] == "free space 150.0 KiB < 250.0 KiB"
    assert present(store) == sorted(set(sizes) - set(gone))
    for dirname in sizes:
        assert store.meta(dirname).exists() == (dirname not in gone)
        assert store.meta(dirname, ".exclude").exists() == (dirname not in gone)
    assert list(store.trash.iterdir()) == []


@needs_ionice
def test_make_room_for_inodes(store: Storage) -> None:
    """Short of inodes with bytes to spare, cleanup removes for inodes."""
    sizes = populate(store, INVENTORY)
    disk = FakeDisk(store, sizes, base_free=10 * GiB, free_inodes=999)
    removed = make_room(store, settings_for(GiB), measure=disk)
    assert [r["snapshot"] for r in removed] == [snapshot_dirname("alpha", T0)]
    assert removed[0]["reason"] == "free inodes 999 < 1000"


@needs_ionice
@pytest.mark.parametrize("min_keep", [1, 2])
def test_make_room_no_space(store: Storage, min_keep: int) -> None:
    """If removing down to min_keep cannot free enough, NoSpace says how much is
    free, what is needed and min_keep, and every name keeps its newest
    min_keep snapshots."""
    sizes = populate(store, INVENTORY)
    disk = FakeDisk(store, sizes, base_free=0)
    with pytest.raises(NoSpace) as info:
        make_room(store, settings_for(10 * GiB, min_keep=min_keep), measure=disk)
    message = str(info.value)
    assert "free space" in message
    assert "10.0 GiB" in message
    assert f"min_keep={min_keep}" in message
    kept = {name: sorted(tss)[-min_keep:] for name, tss in INVENTORY.items()}
    assert present(store) == sorted(
        snapshot_dirname(name, ts) for name, tss in kept.items() for ts in tss
    )
    assert info.value.exit_code == 6 and not info.value.transient


@needs_ionice
def test_dry_run_removes_nothing(store: Storage) -> None:
    """A dry run lists what it would remove and leaves every snapshot and record."""
    sizes = populate(store, INVENTORY)
    disk = FakeDisk(store, sizes, base_free=0)
    before = present(store)
    blocks = exclusive_usage(store.root / snapshot_dirname("alpha", T0))[0]
    would = make_room(store, settings_for(2 * blocks), dry_run=True, measure=disk)
    assert [r["snapshot"] for r in would] == [
        snapshot_dirname("alpha", T0), snapshot_dirname("beta", T0 + 10)
    ]
    assert present(store) == before
    assert all(store.meta(d).exists() for d in sizes)


@needs_ionice
def test_dry_run_that_cannot_free_enough(store: Storage) -> None:
    """A dry run that cannot free enough lists every removal cleanup could make,
    then says it cannot free enough; it removes nothing and does not raise."""
    sizes = populate(store, INVENTORY)
    (store.inprogress("failed") / "etc").mkdir(parents=True)
    before = present(store)
    would = make_room(store, settings_for(100 * GiB), dry_run=True,
                      measure=FakeDisk(store, sizes, base_free=0))
    assert [r["snapshot"] for r in would] == [
        snapshot_dirname("alpha", T0), snapshot_dirname("beta", T0 + 10),
        snapshot_dirname("alpha", T0 + 86400), None,
    ]
    assert would[-1]["rule"] == "cannot free enough"
    assert would[-1]["reason"].startswith("free space ")
    assert present(store) == before
    assert store.inprogress_names() == ["failed"]


@needs_ionice
def test_dry_run_estimate_matches_a_real_run(store: Storage, tmp_path: Path) -> None:
    """When the disk frees what exclusive_usage() counts, a dry run lists the
    same removals that a real run then makes."""
    populate(store, INVENTORY)
    sizes = {s.dirname: exclusive_usage(store.root / s.dirname)[0] for s in store.snapshots()}
    one = next(iter(sizes.values()))
    disk = FakeDisk(store, sizes, base_free=one // 2)
    wanted = settings_for(3 * one)
    would = make_room(store, wanted, dry_run=True, measure=disk)
    did = make_room(store, wanted, measure=disk)
    assert [r["snapshot"] for r in would] == [r["snapshot"] for r in did]
    assert len(did) == 3


@needs_ionice
def test_make_room_finishes_trash_and_stale_inprogress(store: Storage) -> None:
    """Before measuring, leftovers in trash are deleted, and in-progress dirs of
    grabs abandoned long ago are removed, unless a grab of that name holds its
    lock."""
    (store.trash / "old.snap" / "d").mkdir(parents=True)
    (store.trash / "old.snap" / "d" / "f").write_text("x")
    for name in ("stale", "fresh", "locked"):
        (store.inprogress(name) / "etc").mkdir(parents=True)
    week_ago = time.time() - 8 * 86400
    for name in ("stale", "locked"):
        os.utime(store.inprogress(name), (week_ago, week_ago))
    disk = FakeDisk(store, {}, base_free=10 * GiB)
    with locks.held(store.lock("locked")):
        removed = make_room(store, settings_for(GiB), measure=disk)
    assert [r["snapshot"] for r in removed] == ["in-progress stale"]
    assert store.inprogress_names() == ["fresh", "locked"]
    assert list(store.trash.iterdir()) == []


# -- exclusive_usage -----------------------------------------------------------------


def blocks(path: Path) -> int:
    return os.lstat(path).st_blocks * 512


def test_exclusive_usage_counts_only_unshared_inodes(tmp_path: Path) -> None:
    """exclusive_usage() counts a file's blocks once, and only if every link to
    it is inside the tree: a file hard-linked from another snapshot is not
    freed by removing this one; one linked twice inside it is, once."""
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "sub").mkdir(parents=True)
    b.mkdir()
    (a / "own").write_bytes(os.urandom(20 * KiB))
    (b / "shared").write_bytes(os.urandom(40 * KiB))
    os.link(b / "shared", a / "shared")
    (a / "twice").write_bytes(os.urandom(12 * KiB))
    os.link(a / "twice", a / "sub" / "twice")
    (a / "link").symlink_to("own")
    (a / "dirlink").symlink_to("sub")

    nbytes, inodes = exclusive_usage(a)
    expected = blocks(a / "own") + blocks(a / "twice") + blocks(a / "link") + blocks(
        a / "dirlink")
    assert nbytes == expected
    assert nbytes >= 32 * KiB
    # two directories, own, twice (once), and the two symlinks
    assert inodes == 2 + 4
    # b alone: its only file is shared with a
    assert exclusive_usage(b) == (0, 1)


def test_exclusive_usage_matches_du_on_a_tree_without_sharing(tmp_path: Path) -> None:
    """On a tree that shares nothing, the bytes are du's apparent total of files."""
    tree = tmp_path / "t"
    (tree / "d").mkdir(parents=True)
    for i in range(5):
        (tree / "d" / f"f{i}").write_bytes(os.urandom(3000 * (i + 1)))
    files = [p for p in tree.rglob("*") if p.is_file()]
    assert exclusive_usage(tree) == (sum(blocks(p) for p in files), 2 + len(files))


def test_parse_size_used_by_need() -> None:
    """min_free_abs is read with parse_size (binary units)."""
    assert need(Settings(min_free_abs="5G"), usage(), 0).bytes == parse_size("5G") == 5 * GiB



# -- fair shares (issue 11) -----------------------------------------------------------


def usages_of(inventory: Mapping[str, Sequence[int]], each: Mapping[str, int]
              ) -> dict[str, NameUsage]:
    """A usage where every snapshot of ``name`` frees ``each[name]`` bytes and one inode."""
    return {name: NameUsage(tuple(snapshot_dirname(name, t) for t in sorted(tss)),
                            tuple((each[name], 1) for _ in tss))
            for name, tss in inventory.items()}


def order(queue: FairQueue) -> list[tuple[str, int]]:
    return [(s.name, s.timestamp) for s, _, _ in queue]


@HYP
@given(inventories, st.integers(1, 4))
def test_fair_queue_without_shares_is_the_classic_rule(
    inventory: dict[str, list[int]], min_keep: int
) -> None:
    """With shares off (or nobody over its share) the order is the design's
    classic rule, whatever name grabs."""
    for current in (None, *inventory):
        queue = FairQueue(snapshots_of(inventory), {}, Share(None, None), current=current,
                          min_keep=min_keep)
        assert order(queue) == reference_queue(inventory, min_keep)


def test_attacker_over_its_share_pays_before_a_victim_within_it() -> None:
    """A victim within its share grabs: the attacker (over its share) loses its
    oldest first, below min_keep, and at last even its only snapshot (no grab
    of it runs); the victim and a third name within their shares lose nothing."""
    inventory = {"attacker": [1, 2, 3, 4], "victim": [10, 20], "other": [5, 6, 7, 8, 9]}
    usages = usages_of(inventory, {"attacker": 30 * KiB, "victim": KiB, "other": KiB})
    queue = FairQueue(snapshots_of(inventory), usages, Share(20 * KiB, None), current="victim",
                      min_keep=2)
    got = order(queue)
    assert got[:4] == [("attacker", 1), ("attacker", 2), ("attacker", 3), ("attacker", 4)]
    # then the classic rule among names within their share, never below min_keep
    assert got[4:] == [("other", 5), ("other", 6), ("other", 7)]
    assert not queue.over("attacker") and "attacker" not in queue.left


def test_only_snapshot_of_a_busy_name_is_never_taken() -> None:
    """An over-share name whose grab runs keeps its newest (its --link-dest)."""
    inventory = {"attacker": [1, 2], "victim": [10]}
    usages = usages_of(inventory, {"attacker": 30 * KiB, "victim": KiB})
    queue = FairQueue(snapshots_of(inventory), usages, Share(20 * KiB, None), current="victim",
                      min_keep=1, busy={"attacker"})
    assert order(queue) == [("attacker", 1)]


def test_prune_does_not_take_the_only_snapshot_of_a_name_over_its_share() -> None:
    """Rule 3 is for a grab within its share: a prune leaves an over-share
    name its newest."""
    inventory = {"big": [1, 2, 3], "small": [10, 11]}
    usages = usages_of(inventory, {"big": 30 * KiB, "small": KiB})
    queue = FairQueue(snapshots_of(inventory), usages, Share(20 * KiB, None), current=None,
                      min_keep=1)
    assert order(queue) == [("big", 1), ("big", 2), ("small", 10)]


def test_a_name_over_its_share_pays_alone_for_its_grab() -> None:
    """The attacker grabs while over its share: only its own oldest go, down to
    its newest, then the queue ends (NoSpace) and nobody else loses anything."""
    inventory = {"attacker": [1, 2, 3], "victim": [10, 20, 30]}
    usages = usages_of(inventory, {"attacker": 30 * KiB, "victim": KiB})
    queue = FairQueue(snapshots_of(inventory), usages, Share(20 * KiB, None),
                      current="attacker", min_keep=1)
    assert order(queue) == [("attacker", 1), ("attacker", 2)]
    assert queue.over("attacker")


def test_inodes_count_for_the_share_too() -> None:
    """A name over its inode share pays first even when its bytes are small."""
    inventory = {"many": [1, 2], "few": [10, 11]}
    usages = {"many": NameUsage(("a", "b"), ((10, 600), (10, 600))),
              "few": NameUsage(("c", "d"), ((10, 10), (10, 10)))}
    queue = FairQueue(snapshots_of(inventory), usages, Share(GiB, 1000), current="few",
                      min_keep=1)
    assert order(queue) == [("many", 1), ("few", 10)]


fair_cases = st.tuples(
    st.dictionaries(st.sampled_from("abcde"), st.sets(st.integers(0, 50), min_size=1,
                                                      max_size=6).map(sorted), min_size=1),
    st.dictionaries(st.sampled_from("abcde"), st.integers(0, 100)),
    st.integers(1, 200), st.integers(1, 3), st.sampled_from([None, *"abcde"]),
    st.sets(st.sampled_from("abcde")),
)


@HYP
@given(fair_cases)
def test_fair_queue_invariants(case: tuple[dict[str, list[int]], dict[str, int], int, int,
                                           str | None, set[str]]) -> None:
    """For any storage: a name within its share never goes below min_keep; a
    busy name keeps its newest; a grab over its share takes only from itself
    and keeps its newest; every name loses its oldest first."""
    inventory, each, share_bytes, min_keep, current, busy = case
    per = {n: each.get(n, 5) for n in inventory}
    usages = usages_of(inventory, per)
    within = {n for n in inventory if per[n] * len(inventory[n]) <= share_bytes}
    queue = FairQueue(snapshots_of(inventory), usages, Share(share_bytes, None),
                      current=current, min_keep=min_keep, busy=busy)
    got = order(queue)
    for name, tss in inventory.items():
        gone = [t for n, t in got if n == name]
        assert gone == tss[: len(gone)]
        if name in within:
            assert len(tss) - len(gone) >= min(min_keep, len(tss))
        if name in busy or name == current:
            assert len(gone) < len(tss)
    if current in inventory:
        # while the grabbing name is over its share, only it pays
        held = per[current] * len(inventory[current])
        for name, _ in got:
            if held <= share_bytes:
                break
            assert name == current
            held -= per[current]
        if held > share_bytes:
            assert {n for n, _ in got} <= {current}


# -- usage of a name ------------------------------------------------------------------


def test_walk_name_charges_each_inode_once_to_its_newest_snapshot(tmp_path: Path) -> None:
    """A file hard-linked through three snapshots is freed by removing the last
    of them; a file also linked from outside the name is shared, charged to
    nobody; directories count as inodes with their blocks."""
    snaps = [tmp_path / f"s{i}" for i in range(3)]
    for s in snaps:
        s.mkdir()
    (snaps[0] / "kept").write_bytes(os.urandom(40 * KiB))
    os.link(snaps[0] / "kept", snaps[1] / "kept")
    os.link(snaps[0] / "kept", snaps[2] / "kept")
    (snaps[0] / "gone").write_bytes(os.urandom(20 * KiB))
    (snaps[1] / "new").write_bytes(os.urandom(12 * KiB))
    (tmp_path / "outside").write_bytes(os.urandom(8 * KiB))
    os.link(tmp_path / "outside", snaps[2] / "outside")
    freed, shared = walk_name(snaps)
    dirs = [blocks(s) for s in snaps]
    assert freed[0] == (dirs[0] + blocks(snaps[0] / "gone"), 2)
    assert freed[1] == (dirs[1] + blocks(snaps[1] / "new"), 2)
    assert freed[2] == (dirs[2] + blocks(snaps[2] / "kept"), 2)
    assert shared == blocks(tmp_path / "outside")


@needs_ionice
def test_usage_is_cached_until_the_snapshot_list_changes(store: Storage) -> None:
    """The walk runs once per snapshot list: a second call reads the cache (a
    file added since is not seen); a new snapshot makes it walk again."""
    populate(store, {"n": [T0, T0 + 1]})
    first = cached_usage(store, "n", store.snapshots("n"))
    assert json.loads(store.usage("n").read_text())["snapshots"] == list(first.snapshots)
    (store.root / snapshot_dirname("n", T0) / "late").write_bytes(os.urandom(64 * KiB))
    assert cached_usage(store, "n", store.snapshots("n")) == first
    populate(store, {"n": [T0 + 2]})
    again = cached_usage(store, "n", store.snapshots("n"))
    assert len(again.freed) == 3 and again.bytes >= first.bytes + 64 * KiB


@needs_ionice
def test_make_room_with_shares_takes_from_the_name_over_its_share(store: Storage) -> None:
    """On a real storage dir: a grab of the victim (within its share) removes
    the attacker's snapshots, oldest first, and keeps all of the victim's,
    updating the attacker's cached usage without another walk."""
    populate(store, {"victim": [T0, T0 + 1]})
    for i in range(4):
        d = store.root / snapshot_dirname("attacker", T0 + 10 + i)
        d.mkdir()
        (d / "fill").write_bytes(os.urandom(200 * KiB))
    sizes = {s.dirname: (300 * KiB if s.name == "attacker" else 10 * KiB)
             for s in store.snapshots()}
    disk = FakeDisk(store, sizes, base_free=0)
    wanted = settings_for(500 * KiB, min_keep=2, name_max_bytes="auto",
                          name_max_inodes="off")
    removed = make_room(store, wanted, measure=disk, current="victim")
    assert [r["snapshot"] for r in removed] == [
        snapshot_dirname("attacker", T0 + 10), snapshot_dirname("attacker", T0 + 11)]
    assert "attacker is over its share" in removed[0]["rule"]
    assert [s.dirname for s in store.snapshots("victim")] == [
        snapshot_dirname("victim", T0), snapshot_dirname("victim", T0 + 1)]
    cached = json.loads(store.usage("attacker").read_text())
    assert cached["snapshots"] == [s.dirname for s in store.snapshots("attacker")]


@needs_ionice
def test_grab_over_its_share_fails_without_touching_others(store: Storage) -> None:
    """The attacker's own grab, over its share even with one snapshot, removes
    only its own oldest and then fails with NoSpace naming its share; the
    victim keeps all of its snapshots."""
    populate(store, {"victim": [T0, T0 + 1, T0 + 2]})
    for i in range(3):
        d = store.root / snapshot_dirname("attacker", T0 + 10 + i)
        d.mkdir()
        (d / "fill").write_bytes(os.urandom(200 * KiB))
    disk = FakeDisk(store, {s.dirname: 10 * KiB for s in store.snapshots()}, base_free=0)
    with pytest.raises(NoSpace, match="attacker holds .* share") as info:
        make_room(store, settings_for(GiB, name_max_bytes="100K"), measure=disk,
                  current="attacker")
    assert info.value.exit_code == 6
    assert [s.timestamp for s in store.snapshots("attacker")] == [T0 + 12]
    assert len(store.snapshots("victim")) == 3


def test_auto_shares_divide_the_storage() -> None:
    """auto: capacity (used + free) divided by the names; a size or number as
    given; off: no limit."""
    use = Usage(free_bytes=60 * GiB, used_bytes=40 * GiB, free_inodes=700, used_inodes=300,
                has_inodes=True)
    assert shares(Settings(), use, 4) == Share(25 * GiB, 250)
    assert shares(Settings(name_max_bytes="10G", name_max_inodes="off"), use, 4) == Share(
        10 * GiB, None)
    assert shares(Settings(), dataclasses.replace(use, has_inodes=False), 0) == Share(
        100 * GiB, None)


# -- names (issue 11: max_names, internal names) ----------------------------------------


def test_max_names_refuses_a_new_name_and_writes_nothing(store: Storage) -> None:
    """Beyond max_names a new name is refused (exit 4, saying what to do)
    before any file of it exists; known names (snapshots, an in-progress dir,
    a registration) pass, and the storage stays as it was."""
    populate(store, {"a": [T0], "b": [T0]})
    store.inprogress("c").mkdir()
    store.pin("d").write_text("ssh-ed25519 AAAA registered\n")  # registered, no grab yet
    before = support.tree_state(store.root)  # metadata and content, not names (issue 13)
    with pytest.raises(InvalidRequest, match="max_names=4") as info:
        admit(store, Settings(max_names=4), "intruder")
    assert info.value.exit_code == 4 and not info.value.transient
    assert support.tree_state(store.root) == before
    for known in ("a", "b", "c", "d"):
        admit(store, Settings(max_names=4), known)
    admit(store, Settings(max_names=0), "intruder")
    admit(store, Settings(max_names=5), "intruder")


INTERNAL_LOOKING = ["storage", "trash", "run", "jobs", "locks", "names", "usage", "meta"]


@needs_ionice
@pytest.mark.parametrize("name", INTERNAL_LOOKING)
def test_a_grab_of_an_internal_looking_name_does_not_block_cleanup(
    store: Storage, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Holding the real name lock of `storage`, `trash`, ... (a grab of that
    name runs) leaves the storage and trash locks free: cleanup and the trash
    purge of other names go on at once (issue 11, attack 8)."""
    monkeypatch.setattr(retention, "STORAGE_LOCK_WAIT", 0.5)
    populate(store, {"other": [T0, T0 + 1]})
    (store.trash / "left.over" / "d").mkdir(parents=True)
    with locks.held(store.lock(name)):
        assert store.lock(name) not in (store.storage_lock, store.trash_lock)
        removed = make_room(store, settings_for(GiB), current="other",
                            measure=FakeDisk(store, {}, base_free=GiB + 1))
        assert removed == []
        assert list(store.trash.iterdir()) == []
        assert not locks.is_held(store.storage_lock)
        assert retention.busy(store, name)


def test_legacy_name_locks_are_honoured_except_where_they_collide(store: Storage) -> None:
    """A worker of the old layout locks locks/NAME.lock: cleanup counts that
    name as busy; for `storage` and `trash` the old path is the storage-wide
    lock and means nothing about a name."""
    old = store.state / "locks" / "host.lock"
    assert store.legacy_lock("host") == old
    for internal in ("storage", "trash", "scheduler"):
        assert store.legacy_lock(internal) is None
    with locks.held(old):
        assert retention.busy(store, "host")
    assert not retention.busy(store, "host")
    with locks.held(store.storage_lock):
        assert not retention.busy(store, "storage")


def test_list_shows_what_each_name_holds_alone(store: Storage) -> None:
    """`bakgrab list` data: a file hard-linked through both snapshots of a name
    counts once in the name's alone_bytes, and in neither snapshot's own."""
    first, second = (store.root / snapshot_dirname("n", T0 + i) for i in range(2))
    first.mkdir()
    second.mkdir()
    (first / "big").write_bytes(os.urandom(64 * KiB))
    os.link(first / "big", second / "big")
    entry = next(e for e in inventory(store.root) if e["name"] == "n")
    dirs = blocks(first) + blocks(second)
    assert entry["alone_bytes"] == dirs + blocks(first / "big")
    assert entry["alone_inodes"] == 3 and entry["shared_bytes"] == 0
    assert [s["alone_bytes"] for s in entry["snapshots"]] == [0, 0]


@needs_ionice
def test_a_storage_of_the_old_layout_keeps_working(tmp_path: Path) -> None:
    """A storage made before locks/names/ and usage/ existed (name locks as
    locks/NAME.lock): prepare() adds the new dirs, keeps the old files, and
    cleanup with shares runs on it (upgrade without migration)."""
    root = tmp_path / "old"
    for sub in ("inprogress", "meta", "pins", "locks", "jobs", "run", "trash"):
        (root / ".bakgrab" / sub).mkdir(parents=True, mode=0o700)
    for old in ("host.lock", "storage.lock", "trash.lock"):
        (root / ".bakgrab" / "locks" / old).touch()
    store = Storage(root).prepare()
    assert (store.state / "locks" / "names").is_dir() and (store.state / "usage").is_dir()
    assert (store.state / "locks" / "host.lock").exists()
    populate(store, {"host": [T0, T0 + 1], "other": [T0 + 2]})
    sizes = {s.dirname: 100 * KiB for s in store.snapshots()}
    removed = make_room(store, settings_for(150 * KiB, name_max_bytes="auto"), current="other",
                        measure=FakeDisk(store, sizes, base_free=100 * KiB))
    assert [r["snapshot"] for r in removed] == [snapshot_dirname("host", T0)]
