"""The compress setting end to end (issue 19): real redis-server, ``bakgrab
worker``, the client's one-shot sshd, its gate and rrsync -ro, ssh and rsync.

Each backup's rsync argv is read from the worker's debug log (bakgrab's
process gateway logs every program it starts as ``run: ...``); the bytes on
the wire from rsync's own statistics; the snapshot is compared with its
source by ``rsync -naHAX --checksum``; the choice from the snapshot's
metadata and the grab's result.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import re
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bakgrab.worker import compress
from tests import support
from tests.conftest import need_root

pytestmark = pytest.mark.integration

RUN_RE = re.compile(r"run: \S*rsync (?P<args>.*?) --rsh=")
"""The worker's debug line of the pull's rsync, up to its ssh command."""


def build_tree(src: Path) -> None:
    """Compressible text (a few MiB), incompressible bytes, a hard link and a
    symlink: what compression may change on the wire but never on disk."""
    (src / "text").mkdir(parents=True)
    line = b"the quick brown fox jumps over the lazy dog, again and again\n"
    for i in range(8):
        (src / "text" / f"log{i}.txt").write_bytes(line * (8000 + i))
    (src / "random.bin").write_bytes(os.urandom(256 << 10))
    (src / "photo.jpg").write_bytes(os.urandom(64 << 10))  # in --skip-compress
    os.link(src / "text" / "log0.txt", src / "text" / "hardlink.txt")
    os.symlink("text/log1.txt", src / "link")


def backup(tmp_path: Path, setting: str | None, name: str) -> tuple[dict[str, Any], str,
                                                                   dict[str, Any], Path, str]:
    """One real backup of a fresh tree with ``setting`` (None: the default);
    the result, the pull's rsync arguments, the snapshot's metadata and the
    source."""
    redis_proc, url = support.start_redis(tmp_path / "redis")
    storage = tmp_path / "storage"
    args = ["--loglevel", "DEBUG"] + (["--compress", setting] if setting else [])
    worker = None
    try:
        worker = support.start_worker(storage, url, tmp_path / "worker.log", *args)
        src = tmp_path / "src"
        build_tree(src)
        done = support.run_backup(url, name, src, "--json", timeout=120)
        assert done.returncode == 0, done.stderr + worker.text()[-3000:]
        result = json.loads(done.stdout)
        assert worker.alive()
        log = worker.text()
    finally:
        if worker is not None:
            worker.stop()
        redis_proc.stop()
    runs = [m.group("args") for m in RUN_RE.finditer(log)]
    assert len(runs) == 1, runs  # one pull: no fallback, no retry
    [snap] = support.snapshots(storage, name)
    meta = json.loads((storage / ".bakgrab" / "meta" / f"{snap.name}.json").read_text())
    assert support.rsync_diff(src, snap) == []
    return result, runs[0], meta, src, log


def unique_bytes(src: Path) -> int:
    """The bytes of the tree's regular files, each inode once (a hard link
    crosses the wire as a name only)."""
    seen = {(p.lstat().st_ino): p.lstat().st_size for p in src.rglob("*")
            if p.is_file() and not p.is_symlink()}
    return sum(seen.values())


def compress_words(args: str) -> list[str]:
    return [w for w in args.split() if w == "-z" or w.startswith("--compress")
            or (w.startswith("-") and not w.startswith("--") and "z" in w)]


def test_off_sends_no_z_and_the_snapshot_is_identical(tmp_path: Path) -> None:
    """``--compress off``: the rsync the worker starts has no -z at all, the
    bytes on the wire are no fewer than the files' (nothing was compressed),
    and the snapshot equals its source."""
    result, args, meta, src, _ = backup(tmp_path, "off", "plain")
    assert args.startswith("-HaAX --sparse"), args
    assert compress_words(args) == []
    assert "--skip-compress=" in args
    assert result["bytes_transferred"] >= unique_bytes(src) > 4 << 20
    assert meta["compress"]["setting"] == "off" and meta["compress"]["used"] == "off"
    assert result["compress"]["used"] == "off"


def test_zstd_1_passes_rrsync_and_compresses(tmp_path: Path) -> None:
    """``--compress zstd:1``: the worker's rsync asks for zstd level 1; the
    client's gate and rrsync -ro let it through (the pull succeeds in one
    run), the text crosses the wire compressed, and the snapshot is identical."""
    result, args, meta, _, _ = backup(tmp_path, "zstd:1", "zstd")
    assert compress_words(args) == ["-z", "--compress-choice=zstd", "--compress-level=1"]
    assert "--skip-compress=" in args
    # ~4 MiB of repeated text and 320 KiB of random bytes: far fewer bytes sent
    assert result["bytes_transferred"] < result["total_size"] / 4, result
    assert meta["compress"]["used"] == "zstd:1"
    assert meta["compress"]["why"] == "set by the operator"
    assert "fallback" not in meta["compress"]


def test_auto_on_loopback_chooses_off_and_says_why(tmp_path: Path) -> None:
    """The default, ``auto``: for a client on this host (loopback) it sends no
    -z, and records the choice and its reason in the snapshot's metadata and
    the grab's result; with AES instructions it offers ssh AES-GCM first,
    and the client's one-shot sshd accepts it (the pull succeeds)."""
    result, args, meta, _, log = backup(tmp_path, None, "auto")
    assert compress_words(args) == []
    chosen = meta["compress"]
    assert chosen["setting"] == "auto" and chosen["used"] == "off"
    assert "loopback" in chosen["why"]
    assert chosen["measured"]["link"] == "loopback"
    assert chosen["measured"]["cpus"] == os.cpu_count()
    assert result["compress"] == chosen
    # ssh's cipher the same way: this host's CPU is the client's too
    if compress.cpu_has_aes():
        assert chosen["ssh_ciphers"] == compress.AES_GCM_FIRST
        assert f"-o Ciphers={compress.AES_GCM_FIRST} " in log
    else:
        assert "ssh_ciphers" not in chosen and "Ciphers=" not in log


class Peer:
    """A client host in a network namespace of its own, wired to this host by
    a veth pair (198.19.X.Y/30 addresses, made and removed here): the worker
    reaches it on-link, not over loopback."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.ns = f"bkgc{tag}"
        self.here_dev = f"bkgc{tag}h"
        third = int(tag[:2], 16)
        fourth = (int(tag[2:4], 16) % 64) * 4
        self.here = f"198.19.{third}.{fourth + 1}"
        self.there = f"198.19.{third}.{fourth + 2}"
        subprocess.run(["ip", "netns", "add", self.ns], check=True, capture_output=True)
        try:
            for argv in (
                ["link", "add", self.here_dev, "type", "veth", "peer", "name", "eth0",
                 "netns", self.ns],
                ["addr", "add", f"{self.here}/30", "dev", self.here_dev],
                ["link", "set", self.here_dev, "up"],
                ["-n", self.ns, "addr", "add", f"{self.there}/30", "dev", "eth0"],
                ["-n", self.ns, "link", "set", "eth0", "up"],
                ["-n", self.ns, "link", "set", "lo", "up"],
            ):
                subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=10)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.here_dev], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=10)


@pytest.mark.root
def test_auto_over_a_link_measures_it_for_the_next_grab(tmp_path: Path) -> None:
    """A client on another host (a network namespace, on-link): the first
    ``auto`` grab has no measurement and uses zstd:3 (rsync's own -z level),
    records the link's rates in the snapshot's metadata, and the next grab
    chooses from exactly those, saying so; both snapshots equal the source."""
    need_root()
    peer = Peer()
    redis_proc = worker = None
    try:
        redis_proc, url = support.start_redis(tmp_path / "redis",
                                              # reachable from the peer's namespace only
                                              ["--bind", "127.0.0.1", peer.here,
                                               "--protected-mode", "no"])
        storage = tmp_path / "storage"
        worker = support.start_worker(storage, url, tmp_path / "worker.log", "--loglevel", "DEBUG")
        url = url.replace("127.0.0.1", peer.here)  # the client's way to the broker
        src = tmp_path / "src"
        src.mkdir()
        # 64 MiB of base64 text: enough data and time for a measurement
        for i in range(4):
            (src / f"part{i}.txt").write_bytes(base64.b64encode(os.urandom(12 << 20)))
        metas = []
        for _ in range(2):
            done = subprocess.run(
                ["ip", "netns", "exec", peer.ns, support.BAKGRAB, "backup", "--broker", url,
                 "--name", "far", "--source", str(src), "--json"],
                capture_output=True, text=True, timeout=180, env=dict(os.environ))
            assert done.returncode == 0, done.stderr + worker.text()[-3000:]
            snap = support.snapshots(storage, "far")[-1]
            assert support.rsync_diff(src, snap) == []
            metas.append(json.loads(
                (storage / ".bakgrab" / "meta" / f"{snap.name}.json").read_text()))
            assert json.loads(done.stdout)["compress"] == metas[-1]["compress"]
        assert worker.alive()
    finally:
        if worker is not None:
            worker.stop()
        if redis_proc is not None:
            redis_proc.stop()
        peer.close()
    first, second = (m["compress"] for m in metas)
    assert first["measured"]["link"] == "on-link", first
    assert first["used"] == "zstd:3" and "not measured" in first["why"]
    assert metas[0]["client"]["address"] == peer.there
    link = first["link"]
    assert link["data_rate"] > 0 and link["wire_rate"] > 0 and link["used"] == "zstd:3"
    # the wire carried fewer bytes than the data: zstd really ran
    assert metas[0]["stats"]["bytes_received"] < metas[0]["stats"]["total_size"]
    seen = compress.previous_link(metas[0])
    expected = compress.choose("auto", link="on-link", cpus=os.cpu_count() or 1,
                               previous=seen, available=compress.worker_list())
    assert (second["used"], second["why"]) == (expected.used, expected.why)
    assert "previous grab moved" in second["why"]
    assert second["measured"]["previous"]["from"] == metas[0]["snapshot"]


@pytest.mark.root
def backup_as_fussy_client(shared_tmp: Path, bashrc: str, *worker_args: str
                           ) -> tuple[dict[str, Any], str, Path, Path]:
    """One real backup of :func:`build_tree` by a client user of its own
    whose ~/.bashrc (which the login shell of its one-shot sshd reads) is
    ``bashrc``: rsync's own ``RSYNC_*_LIST`` variables make its rsync offer
    less in the negotiation, as an older one does. The result, the worker's
    debug log, the storage and the source; the user is removed after."""
    need_root()
    name = f"bkgz{secrets.token_hex(3)}"
    home = shared_tmp / "home"
    home.mkdir()
    subprocess.run(["useradd", "-M", "-d", str(home), "-s", "/bin/bash", name], check=True,
                   timeout=30)
    redis_proc = worker = None
    try:
        subprocess.run(["usermod", "-p", "*", name], check=True, timeout=30)
        (home / ".bashrc").write_text(bashrc)
        src = shared_tmp / "src"
        build_tree(src)
        for path in [home, *home.rglob("*"), src, *src.rglob("*")]:
            os.lchown(path, *(lambda p: (p.pw_uid, p.pw_gid))(pwd.getpwnam(name)))
        redis_proc, url = support.start_redis(shared_tmp / "redis")
        storage = shared_tmp / "storage"
        worker = support.start_worker(storage, url, shared_tmp / "worker.log",
                                      "--loglevel", "DEBUG", *worker_args)
        env = {"PATH": os.environ["PATH"], "HOME": str(home),
               "XDG_STATE_HOME": str(home / "state")}
        done = support.run_backup(url, "fussy", src, "--json", env=env, user=name)
        assert done.returncode == 0, done.stderr + worker.text()[-3000:]
        result = json.loads(done.stdout)
        log = worker.text()
        assert worker.alive()
    finally:
        if worker is not None:
            worker.stop()
        if redis_proc is not None:
            redis_proc.stop()
        subprocess.run(["userdel", name], check=False, timeout=30)
    return result, log, storage, src


def test_a_choice_the_clients_rsync_refuses_falls_back_at_once(shared_tmp: Path) -> None:
    """The client's rsync accepts only zlib (``RSYNC_COMPRESS_LIST``):
    ``--compress zstd:1`` is refused before any data ("was refused by the
    server"); the worker runs the pull again at once with plain ``-z``, which
    rsync negotiates to zlib, records the fallback, and the snapshot is
    identical and was compressed on the wire. The second run's lines do not
    name what the first may have written: no checksum of rsync's is taken."""
    result, log, storage, src = backup_as_fussy_client(
        shared_tmp, 'export RSYNC_COMPRESS_LIST="zlibx zlib"\n', "--compress", "zstd:1")
    runs = [m.group("args") for m in RUN_RE.finditer(log)]
    assert [compress_words(r) for r in runs] == [
        ["-z", "--compress-choice=zstd", "--compress-level=1"], ["-z"]], runs
    assert "was refused by the server" in log or "refused zstd:1" in log
    [snap] = support.snapshots(storage, "fussy")
    assert support.rsync_diff(src, snap) == []
    meta = json.loads((storage / ".bakgrab" / "meta" / f"{snap.name}.json").read_text())
    chosen = meta["compress"]
    assert chosen["setting"] == "zstd:1" and chosen["used"] == "any"
    assert "refused zstd:1" in chosen["fallback"]
    assert "--compress-choice value (zstd) was refused" in chosen["fallback"]
    assert chosen["link"]["client_refused"] is True
    assert result["compress"] == chosen
    assert result["bytes_transferred"] < unique_bytes(src) / 4  # zlib did compress
    assert (meta["manifest"]["claims"], meta["manifest"]["claimed"]) == ("off", 0)
