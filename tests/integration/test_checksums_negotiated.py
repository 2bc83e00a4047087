"""The manifest and the checksum two rsyncs negotiate (issue 19), with a real
client whose rsync offers only md5, as an rsync older than 3.2 does.

rsync prints the whole-file checksum it verified with ``%C``, and md5's has
as many hex digits as xxh128's: the worker must find out from a file it
reads, take none of the claims, and read every file itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import xxhash

from bakgrab.worker import manifest
from bakgrab.worker.storage import Storage
from tests import support
from tests.integration.test_compress import backup_as_fussy_client

pytestmark = pytest.mark.integration


def test_md5_claims_are_found_out_and_every_file_is_read(shared_tmp: Path) -> None:
    """The client's rsync lists md5 only (``RSYNC_CHECKSUM_LIST``): the pull's
    lines claim md5 digests; the manifest says the claims were refused, none
    was taken, every inode was read, and each entry is the stored file's
    xxh128; the snapshot is identical to its source."""
    result, log, storage, src = backup_as_fussy_client(
        shared_tmp, 'export RSYNC_CHECKSUM_LIST="md5"\n')
    [snap] = support.snapshots(storage, "fussy")
    assert snap.name == result["snapshot"]
    assert support.rsync_diff(src, snap) == []
    built = json.loads((storage / ".bakgrab" / "meta" / f"{snap.name}.json")
                       .read_text())["manifest"]
    assert built["claims"].startswith("refused"), built
    assert built["claimed"] == 0 and built["claims_refused"] == 0
    assert built["prehashed"] + built["hashed"] == built["inodes"] == 10, built
    found = manifest.load(Storage(storage), snap.name)
    assert found is not None and len(found.entries) == 11  # (a hard link: 10 inodes)
    for e in found.entries:
        assert e.digest == "xxh128:" + xxhash.xxh3_128((snap / e.path).read_bytes()).hexdigest()
    assert "rsync's checksums not used" in log
