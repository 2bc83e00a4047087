"""The hard-link backend at ext4's link limit (issue 14), on a real loop-mounted ext4.

A source file with 33,000 hard links, backed up twice: the second grab's
``--link-dest`` would give the first snapshot's inode 66,000 links, past
ext4's 65,000. rsync 3.4-3.5 then fails the pull (exit 2, after linking part
of the group); bakgrab must store those files as a new copy instead, warn,
and publish a complete snapshot.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path

import pytest
import xxhash

from bakgrab.tasks.caps import WORKER_CAPS
from bakgrab.worker import manifest
from bakgrab.worker.storage import Storage
from tests import support
from tests.conftest import need_root

pytestmark = [pytest.mark.integration, pytest.mark.root]

LINKS = 33_000


def ext4_mount(size: int = 256 << 20) -> contextlib.AbstractContextManager[Path]:
    """A fresh ext4 in a loop image, mounted (support.loop_mount)."""
    need_root()
    return support.loop_mount("ext4", size)


def test_file_past_the_link_limit_is_copied_with_a_warning(shared_tmp: Path,
                                                           redis_url: str) -> None:
    """As the unprivileged worker, the second backup of a 33,000-link file succeeds (exit 0, not partial),
    warns that files at the link limit were stored as copies, and is
    identical to the source by `rsync -naHAX --checksum`: the group is one
    new inode with its 33,000 links, the first snapshot's inode keeps its
    own 33,000 (no stray link of the failed pass), and the other files are
    still hard-linked to the first snapshot."""
    with ext4_mount() as mnt, support.throwaway_user(
            f"bkgw{secrets.token_hex(3)}", shared_tmp / "home") as user:
        assert os.pathconf(mnt, "PC_LINK_MAX") == 65_000
        src = mnt / "src"
        (src / "d").mkdir(parents=True)
        (src / "d" / "f0").write_bytes(b"linked many times\n" * 100)
        for i in range(1, LINKS):
            os.link(src / "d" / "f0", src / "d" / f"f{i}")
        (src / "plain").write_bytes(b"plain\n")
        storage = mnt / "storage"
        storage.mkdir(mode=0o700)
        os.chown(storage, user.pw_uid, user.pw_gid)
        worker = support.start_worker(storage, redis_url, shared_tmp / "worker.log",
                                      user=user.pw_name, caps=WORKER_CAPS)
        try:
            results = []
            for _ in range(2):
                done = support.run_backup(redis_url, "ll", src, "--json", timeout=300)
                assert done.returncode == 0, done.stderr + worker.text()[-3000:]
                results.append(json.loads(done.stdout))
        finally:
            worker.stop()
        s1, s2 = support.snapshots(storage, "ll")
        assert results[0]["warnings"] == []
        second = results[1]
        assert second["partial"] is False and second["rsync_exit"] == 0, second
        assert any("hard-link limit" in w for w in second["warnings"]), second["warnings"]
        assert support.rsync_diff(src, s2) == []
        old, new = (s / "d" / "f0" for s in (s1, s2))
        assert old.stat().st_nlink == LINKS and new.stat().st_nlink == LINKS
        assert old.stat().st_ino != new.stat().st_ino
        assert {(s2 / "d" / f"f{i}").stat().st_ino for i in range(0, LINKS, 997)} == {
            new.stat().st_ino}
        assert (s2 / "plain").stat().st_ino == (s1 / "plain").stat().st_ino
        assert not list((storage / ".bakgrab" / "inprogress").iterdir())
        assert not (storage / ".bakgrab" / "heal" / "ll.link-limit").exists()
        # issue 19: the first backup takes rsync's checksums; the second ran
        # rsync twice into one tree, so it takes none, and its new inode's
        # entry is what the file holds
        metas = [json.loads((storage / ".bakgrab" / "meta" / f"{s.name}.json").read_text())
                 ["manifest"] for s in (s1, s2)]
        assert [m["claims"] for m in metas] == ["used", "off"], metas
        found = manifest.load(Storage(storage), s2.name)
        assert found is not None
        assert {e.digest for e in found.entries if e.ino == new.stat().st_ino} == {
            "xxh128:" + xxhash.xxh3_128(new.read_bytes()).hexdigest()}
