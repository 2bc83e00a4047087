"""bakgrab.worker.doctor: which mount holds STORAGE, read from mountinfo text."""

from __future__ import annotations

from pathlib import Path

from bakgrab.worker.doctor import mount_of

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:25 / /srv rw,nosuid,nodev,relatime shared:2 - tmpfs tmpfs rw
31 30 8:2 / /srv/back\\040ups rw,nosuid,relatime shared:3 - ext4 /dev/sda2 rw
32 30 8:3 / /srv/back rw,nodev,nosuid shared:4 - ext4 /dev/sda3 rw
33 31 8:4 / /srv/back\\040ups rw,nodev,nosuid shared:5 - ext4 /dev/sda4 rw
"""


def test_longest_point_wins_and_escapes_are_decoded(tmp_path: Path) -> None:
    """The mount point is matched by path components (``/srv/back`` does not
    hold ``/srv/backups``), octal escapes (``\\040``) are decoded, and of two
    mounts on one point the later one (on top) counts."""
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    assert mount_of(Path("/srv/back ups/x"), str(info)) == (
        "/srv/back ups", {"rw", "nodev", "nosuid"})
    assert mount_of(Path("/srv/back/x"), str(info))[0] == "/srv/back"  # type: ignore[index]
    assert mount_of(Path("/srv/backx"), str(info)) == ("/srv", {"rw", "nosuid", "nodev",
                                                                "relatime"})
    assert mount_of(Path("/home"), str(info)) == ("/", {"rw", "relatime"})
