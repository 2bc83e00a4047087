"""The storage backends' pure parts (issue 14): ioctl numbers, the pull's
argv per backend, rsync's link-limit words, and errors that survive Celery."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import pytest

from bakgrab.worker import backend, btrfs, rsync

# Captured from rsync 3.5.0 pulling a 33,000-link file twice onto ext4 (issue 14).
LINK_LIMIT_STDERR = """\
rsync: [generator] link "/srv/storage/.bakgrab/inprogress/ll/d/f9099" => d/f0 failed: Too many links (31)
File-list index 0 not in 4 - 33004 (finish_hard_link) [generator]
rsync error: protocol incompatibility (code 2) at rsync.c(982) [generator=3.5.0]
rsync error: received SIGUSR1 (code 19) at main.c(1660) [receiver=3.5.0]"""


def test_ioctl_numbers_match_linux_btrfs_h() -> None:
    """The request numbers are those the kernel headers give (computed there
    by _IOW/_IOR/_IOWR on the struct sizes; values as strace prints them)."""
    assert btrfs.IOC_SUBVOL_CREATE == 0x5000940E
    assert btrfs.IOC_SNAP_CREATE_V2 == 0x50009417
    assert btrfs.IOC_SNAP_DESTROY_V2 == 0x5000943F
    assert btrfs.IOC_SUBVOL_GETFLAGS == 0x80089419
    assert btrfs.IOC_SUBVOL_SETFLAGS == 0x4008941A
    assert btrfs.IOC_INO_LOOKUP == 0xD0009412
    assert btrfs.IOC_FS_INFO == 0x8400941F
    assert btrfs.IOC_SYNC == 0x9408
    assert btrfs.FICLONE == 0x40049409
    assert btrfs.FS_IOC_FIEMAP == 0xC020660B
    assert struct.calcsize("qQQ32s4040s") == 4096  # struct btrfs_ioctl_vol_args_v2


def spec(tmp_path: Path, **kw: object) -> rsync.PullSpec:
    values: dict[str, object] = dict(
        user="u", address="127.0.0.1", port=2222, key_file=tmp_path / "key",
        known_hosts=tmp_path / "kh", host_alias="bakgrab-x", exclude_file=tmp_path / "ex",
        dest=tmp_path / "dest", link_dest=tmp_path / "prev", timeout=60, connect_timeout=10,
        alive_interval=15)
    values.update(kw)
    return rsync.PullSpec(**values)  # type: ignore[arg-type]


def test_btrfs_pull_updates_in_place_without_link_dest(tmp_path: Path) -> None:
    """On btrfs the pull runs --inplace --no-whole-file and never --link-dest;
    the hard-link backend's argv has neither in-place option."""
    store = backend.Subvolumes()
    argv = rsync.pull_argv(spec(tmp_path, link_dest=None, backend_options=store.pull_options))
    assert "--inplace" in argv and "--no-whole-file" in argv
    assert not [a for a in argv if a.startswith("--link-dest")]
    assert argv[-1] == f"{tmp_path / 'dest'}/"  # options before the source and dest
    plain = rsync.pull_argv(spec(tmp_path, backend_options=backend.HardLinks().pull_options))
    assert f"--link-dest={tmp_path / 'prev'}" in plain
    assert "--inplace" not in plain and "--no-whole-file" not in plain
    assert store.links is False and backend.HardLinks.links is True


def test_backend_follows_the_filesystem(tmp_path: Path) -> None:
    """A directory on a filesystem other than btrfs gets the hard-link backend."""
    assert not btrfs.on_btrfs(tmp_path)
    assert type(backend.for_path(tmp_path)) is backend.HardLinks
    assert not btrfs.is_subvolume(tmp_path)
    assert btrfs.fs_type(Path("/proc")) == 0x9FA0  # PROC_SUPER_MAGIC: statfs is read right


def test_link_limit_lines_name_the_files_and_classify_as_link_limit() -> None:
    """rsync's generator line names the file whose inode is at the limit;
    the exit 2 it causes is LinkLimit (which a grab answers with a copy),
    not a plain TransferFailed; a sender's line is not taken."""
    assert rsync.at_link_limit(LINK_LIMIT_STDERR) == ["d/f0"]
    sender = 'rsync: [sender] link "x" => y failed: Too many links (31)'
    assert rsync.at_link_limit(sender) == []
    try:
        rsync.classify(2, LINK_LIMIT_STDERR)
    except rsync.LinkLimit as e:
        assert e.paths == ["d/f0"]
        assert e.exit_code == 8
        again = pickle.loads(pickle.dumps(e))  # noqa: S301 -- our own bytes (as Celery does)
        assert isinstance(again, rsync.LinkLimit) and again.paths == ["d/f0"]
    else:
        raise AssertionError("no LinkLimit")


def test_settle_waits_only_after_a_deletion(tmp_path: Path) -> None:
    """Measuring free space waits for btrfs's cleaner only after this process
    deleted a subvolume (elsewhere it costs nothing); after one, it asks the
    filesystem (BTRFS_IOC_SYNC, which a non-btrfs dir refuses) once."""
    backend._deleted = False
    backend.settle(tmp_path)
    backend._deleted = True
    with pytest.raises(OSError):
        backend.settle(tmp_path)
    assert backend._deleted is False
    backend.settle(tmp_path)


def test_measure_settles_only_when_the_usage_falls_short(tmp_path: Path) -> None:
    """After a subvolume deletion, a usage that is already enough is taken as
    it is (blocks still coming back only add to it): no wait for btrfs's
    cleaner (BTRFS_IOC_SYNC, refused by a non-btrfs dir, shows whether it
    was asked); one that falls short is measured again after settling."""
    from bakgrab.worker import retention

    backend._deleted = True
    seen: list[retention.Usage] = []
    usage = retention.measure(tmp_path, lambda u: seen.append(u) is None)
    assert seen == [usage] and usage.free_bytes > 0
    assert backend._deleted is True, "still settling: a later short usage must wait"
    with pytest.raises(OSError):
        retention.measure(tmp_path, lambda u: False)
    assert backend._deleted is False
    assert retention.measure(tmp_path, lambda u: False).free_bytes > 0  # nothing to wait for


def test_newest_owner_counts_each_byte_once_for_its_newest_snapshot() -> None:
    """A file changed in place in the newer snapshot references parts of the
    older one's extent and one new block: the newer owns those parts and its
    block, the older only the bytes it alone still references; overlapping
    ranges are never counted twice (cleanup's fair shares on btrfs)."""
    ranges = {(0, 100): 0, (0, 40): 1, (44, 100): 1, (200, 204): 1, (500, 600): 0}
    assert btrfs.newest_owner(ranges, 2) == [4 + 100, 40 + 56 + 4]
    assert btrfs.newest_owner({}, 3) == [0, 0, 0]
    assert btrfs.newest_owner({(0, 10): 2, (5, 20): 0}, 3) == [10, 0, 10]
