"""bakgrab.client.restore on real directories: the staging dir, the privilege
taken out of what arrived, specials made through fds, the merge (issue 12)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from bakgrab.client import restore as r
from tests.conftest import need_root

OTHER = 54321


@pytest.fixture
def root_fd(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    received = tmp_path / "received"
    received.mkdir(mode=0o700)
    fd = os.open(received, os.O_RDONLY | os.O_DIRECTORY)
    yield received, fd
    os.close(fd)


def test_why_not_private(tmp_path: Path) -> None:
    """0700 and ours on a path nobody else can change, or a reason."""
    def why(path: Path) -> str | None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return r.why_not_private(fd)
        finally:
            os.close(fd)

    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    assert why(d) is None
    d.chmod(0o750)
    assert why(d) == "it is mode 0750, not 0700"
    d.chmod(0o700)
    open_parent = tmp_path / "open"
    (open_parent / "d").mkdir(parents=True)
    (open_parent / "d").chmod(0o700)
    open_parent.chmod(0o777)  # not sticky: anyone could rename d away
    assert why(open_parent / "d") == f"other users can write {open_parent}"
    open_parent.chmod(0o1777)  # sticky, and d is ours: nobody else can move it
    assert why(open_parent / "d") is None


def test_open_staging_makes_dir_0700_and_a_private_wrapper(tmp_path: Path) -> None:
    """A missing --into is made 0700 whatever the umask; the wrapper inside is
    0700 and goes away with everything in it."""
    old = os.umask(0)
    try:
        staging = r.open_staging(tmp_path / "new", privileged=True)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o700
        assert staging.private
        wrapper = tmp_path / "new" / staging.wrapper
        assert stat.S_IMODE(os.stat(wrapper).st_mode) == 0o700
        assert staging.received_path == wrapper / "r"
        (wrapper / "r" / "f").write_text("x")
    finally:
        staging.close()
    assert os.listdir(tmp_path / "new") == []


def test_open_staging_refusals(tmp_path: Path) -> None:
    """--privileged into an open dir (exit 10), a dir others can write, a symlink."""
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    with pytest.raises(r.PrivilegeRefused, match="not 0700") as e:
        r.open_staging(open_dir, privileged=True)
    assert e.value.exit_code == 10
    staging = r.open_staging(open_dir, privileged=False)
    assert not staging.private
    staging.close()
    open_dir.chmod(0o777)
    with pytest.raises(r.ClientSetupError, match="other users can write"):
        r.open_staging(open_dir, privileged=False)
    os.symlink(tmp_path, tmp_path / "link")
    with pytest.raises(r.ClientSetupError, match="symlink"):
        r.open_staging(tmp_path / "link", privileged=False)
    assert os.listdir(open_dir) == []


def test_specials_never_through_a_symlink(tmp_path: Path, root_fd: tuple[Path, int]) -> None:
    """A FIFO whose parent is a symlink out of the received tree is not made,
    nor one whose name exists; a device node only when private."""
    received, fd = root_fd
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, received / "link")
    (received / "d").mkdir()
    (received / "d" / "taken").write_text("mine")
    fifo = {"mode": stat.S_IFIFO | 0o644, "uid": 0, "gid": 0, "major": 0, "minor": 0,
            "mtime_ns": 10**18, "xattrs": {}}
    made, skipped = r.recreate_specials(fd, [
        {**fifo, "path": "link/f"}, {**fifo, "path": "d/taken"},
        {**fifo, "path": "d/dev", "mode": stat.S_IFCHR | 0o600, "major": 1, "minor": 3},
    ], private=False)
    assert (made, skipped) == (0, ["link/f", "d/taken", "d/dev"])
    assert os.listdir(outside) == []
    assert (received / "d" / "taken").read_text() == "mine"


def test_specials_made_exactly_when_private_and_unprivileged_otherwise(
    root_fd: tuple[Path, int]
) -> None:
    """Private: owner, mode with setuid, xattrs and time as listed. Open: ours,
    without the setuid bit, user xattrs only (Linux allows none on a FIFO),
    and reported."""
    need_root()
    received, fd = root_fd
    (received / "d").mkdir()
    entry = {"path": "d/f", "mode": stat.S_IFIFO | 0o4640, "uid": OTHER, "gid": OTHER,
             "major": 0, "minor": 0, "mtime_ns": 10**18,
             "xattrs": {"trusted.b": "Yg=="}}
    assert r.recreate_specials(fd, [entry], private=True) == (1, [])
    st = os.lstat(received / "d" / "f")
    assert (stat.S_ISFIFO(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns) == (
        True, 0o4640, OTHER, 10**18)
    assert os.listxattr(received / "d" / "f") == ["trusted.b"]
    report = r.Report()
    assert r.recreate_specials(fd, [{**entry, "path": "d/g"}], False, report) == (1, [])
    st = os.lstat(received / "d" / "g")
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o640, 0)
    assert os.listxattr(received / "d" / "g") == []
    assert report.stripped == [{"path": "d/g", "dropped": [
        "setuid bit", f"owner uid {OTHER}", f"group gid {OTHER}", "xattr trusted.b"]}]


def test_unprivilege_undoes_what_fake_super_recorded(root_fd: tuple[Path, int]) -> None:
    """The mode --fake-super recorded comes back without setuid/setgid, its
    records go, a symlink stored as a file is a symlink again, a capability
    or a device node that got through anyway is removed, all reported."""
    need_root()
    received, fd = root_fd
    (received / "suid").write_text("x")
    os.chmod(received / "suid", 0o644)
    os.setxattr(received / "suid", "user.rsync.%stat", f"104711 0,0 {OTHER}:0".encode())
    os.setxattr(received / "suid", "user.rsync.security.capability", b"\x01")
    os.setxattr(received / "suid", "user.keep", b"k")
    (received / "link").write_text("../target")
    os.utime(received / "link", ns=(10**18, 10**18))
    os.setxattr(received / "link", "user.rsync.%stat", b"120777 0,0 0:0")
    (received / "cap").write_text("c")
    os.setxattr(received / "cap", "security.capability",
                bytes.fromhex("0100000200200000000000000000000000000000"))
    os.mknod(received / "dev", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.utime(received, ns=(10**18, 10**18))
    report = r.Report()
    r.unprivilege(fd, report)
    st = os.lstat(received / "suid")
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o711, 0)
    assert os.listxattr(received / "suid") == ["user.keep"]
    assert os.readlink(received / "link") == "../target"
    assert os.lstat(received / "link").st_mtime_ns == 10**18
    assert os.listxattr(received / "cap") == []
    assert not (received / "dev").exists()
    assert os.stat(received).st_mtime_ns == 10**18
    dropped = {e["path"]: e["dropped"] for e in report.stripped}
    assert dropped == {"suid": ["setuid bit", f"owner uid {OTHER}",
                                "xattr security.capability"],
                       "cap": ["xattr security.capability"],
                       "dev": ["device node (not created)"]}


def test_merge_moves_replaces_merges_and_refuses(tmp_path: Path,
                                                root_fd: tuple[Path, int]) -> None:
    """New names are moved in, files replaced, dirs merged (their attributes
    the received ones); a dir another user owns, or a file where a dir is,
    is left alone and reported."""
    need_root()
    received, fd = root_fd
    into = tmp_path / "into"
    into.mkdir(mode=0o700)
    for d in ("new", "both", "theirs", "clash"):
        (received / d).mkdir()
    (received / "new" / "f").write_text("new")
    (received / "both" / "f").write_text("received")
    (received / "both").chmod(0o750)
    os.setxattr(received / "both", "user.x", b"1")
    (received / "theirs" / "f").write_text("received")
    (received / "top").write_text("received")
    (into / "both").mkdir()
    (into / "both" / "f").write_text("old")
    (into / "both" / "old").write_text("kept")
    (into / "theirs").mkdir()
    os.chown(into / "theirs", OTHER, OTHER)
    (into / "clash").write_text("a file")
    (into / "top").write_text("old")
    dfd = os.open(into, os.O_RDONLY | os.O_DIRECTORY)
    report = r.Report()
    try:
        r.merge(fd, dfd, "", True, report)
    finally:
        os.close(dfd)
    assert (into / "new" / "f").read_text() == "new"
    assert (into / "both" / "f").read_text() == "received"
    assert (into / "both" / "old").read_text() == "kept"
    assert stat.S_IMODE(os.stat(into / "both").st_mode) == 0o750
    assert os.getxattr(into / "both", "user.x") == b"1"
    assert (into / "top").read_text() == "received"
    assert os.listdir(into / "theirs") == []
    assert (into / "clash").read_text() == "a file"
    assert sorted(e["path"] for e in report.refused) == ["clash", "theirs"]


def test_parse_fake_stat() -> None:
    assert r.parse_fake_stat(b"104755 0,0 0:42") == (0o104755, 0, 42)
    assert r.parse_fake_stat(b"garbage") is None
