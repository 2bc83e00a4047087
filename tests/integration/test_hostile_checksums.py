"""A hostile client's forged itemized lines never put a wrong digest into a manifest (issue 19).

The worker takes the whole-file checksum rsync's receiver prints for a file
(``%C`` of :data:`bakgrab.worker.rsync.ITEM_FORMAT`) as the file's manifest
digest where the claim can stand. The client's rsync sender can send
MSG_INFO messages with any text, which the worker's rsync prints among its
own lines. Here the client is a real malicious peer: its ``rrsync`` (the
first on the client's PATH, which the gate execs as a program) is
``inject_info.py`` around the real rrsync and rsync, forwarding the sender's
stream byte for byte with forged MSG_INFO frames put between its frames.

Forged lines come as whole lines and as a text with no newline, which the
worker's rsync prints in front of the next line it prints: placed right
before a file's checksum in the stream, in front of that file's own line.

What the tests assert are real outcomes: the backup's exit, the stored
bytes, every manifest entry against the stored file, ``bakgrab verify``, the
manifest's build stats, and the injector's own log (the forged lines did go
out, and its parse of the stream never went wrong).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import xxhash

from bakgrab.worker import manifest
from bakgrab.worker.storage import Storage
from tests import support

pytestmark = pytest.mark.integration

INJECTOR = Path(__file__).resolve().with_name("inject_info.py")


def xxh(data: bytes) -> str:
    """xxh128 hex as rsync prints it with ``%C`` (and the manifest stores it)."""
    return xxhash.xxh3_128(data).hexdigest()


def forged(path: str, digest: str, size: int = 3) -> str:
    """An itemized line of a received file, as the worker's rsync prints one."""
    return f">f+++++++++ {size} {digest}|{path}\n"


WRONG = {c: c * 32 for c in "abcdef"}
"""Claims no file here reads as."""


class Hostile:
    """A client environment whose rrsync is the real one behind the injector."""

    def __init__(self, base: Path) -> None:
        real = shutil.which("rrsync")
        assert real, "rrsync is not installed"
        self.plan_file = base / "plan.json"
        self.log_file = base / "inject.log"
        self.bin = base / "hostile-bin"
        self.bin.mkdir()
        script = self.bin / "rrsync"
        argv = [sys.executable, str(INJECTOR), "--plan", str(self.plan_file),
                "--log", str(self.log_file), "--", real]
        script.write_text("#!/bin/sh\nexec " + " ".join(shlex.quote(a) for a in argv)
                          + ' "$@"\n')
        script.chmod(0o755)

    def plan(self, **plan: Any) -> None:
        self.plan_file.write_text(json.dumps(plan))
        self.log_file.unlink(missing_ok=True)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.bin}{os.pathsep}{env['PATH']}"
        return env

    def runs(self) -> list[dict[str, Any]]:
        """The injector's record of each connection it served since :meth:`plan`."""
        if not self.log_file.exists():
            return []
        return [json.loads(line) for line in self.log_file.read_text().splitlines()]

    def injected(self) -> int:
        """Forged frames sent; every run's parse must have held."""
        runs = self.runs()
        assert runs, "the hostile rrsync never ran"
        for run in runs:
            assert run["error"] is None and run["exit"] == 0, run
            assert run["preamble"].get("protocol", 0) >= 30 and run["frames"] > 0, run
        return sum(run["injected"] for run in runs)


def checked_manifest(storage: Path, snap: Path) -> dict[str, str]:
    """Every entry of ``snap``'s manifest, by path, each checked against the
    stored file: its digest is the hash of the file's bytes (xxh128 or
    SHA-256, as it names), its size, mtime and inode the file's; and every
    regular file of the snapshot has one."""
    loaded = manifest.load(Storage(storage), snap.name)
    assert loaded is not None, f"{snap.name} has no manifest"
    digests: dict[str, str] = {}
    for e in loaded.entries:
        path = snap / e.path
        st = path.lstat()
        data = path.read_bytes()
        name, _, hexed = e.digest.partition(":")
        want = {"xxh128": xxh, "sha256": lambda d: hashlib.sha256(d).hexdigest()}[name](data)
        assert hexed == want, f"{e.path}: the manifest says {e.digest}, the file reads as {want}"
        assert (e.size, e.mtime_ns, e.ino) == (st.st_size, st.st_mtime_ns, st.st_ino), e.path
        digests[e.path] = e.digest
    files = {os.path.relpath(os.path.join(d, f), snap) for d, _, fs in os.walk(snap) for f in fs
             if stat.S_ISREG(os.lstat(os.path.join(d, f)).st_mode)}
    assert set(digests) == files
    return digests


def build_stats(storage: Path, snap: Path) -> dict[str, Any]:
    meta = json.loads((storage / ".bakgrab" / "meta" / f"{snap.name}.json").read_text())
    stats: dict[str, Any] = meta["manifest"]
    return stats


def verify_clean(storage: Path) -> None:
    done = subprocess.run([support.BAKGRAB, "verify", "--storage", str(storage), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["bad"] == [] and report["damaged_manifests"] == [], report
    assert report["checked"] >= 1 and report["unverifiable"] == [], report


def grab(redis_url: str, storage: Path, name: str, src: Path,
         env: dict[str, str] | None = None) -> Path:
    """One backup of ``src`` as ``name`` (exit 0, not partial); its snapshot,
    which holds the client's exact bytes and metadata."""
    done = support.run_backup(redis_url, name, src, "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert not json.loads(done.stdout).get("partial"), done.stdout
    snap = support.snapshots(storage, name)[-1]
    assert support.rsync_diff(src, snap) == []
    return snap


def make_tree(src: Path) -> dict[str, bytes]:
    """The client's tree; the contents of its files by path. rsync sends a
    directory's files before its subdirectories, in name order: ``0-first``
    is the first file received (the one the worker reads back to prove the
    claims). In ``h/`` one inode has three names: rsync transfers the last
    in name order (``zzz``) and hard-links the others to it (``hf``)."""
    files = {
        "0-first.txt": b"the first file received: read back, it proves the claims\n",
        "a/real.txt": b"a file with a forged second claim\n",
        "a/big.bin": os.urandom(3 << 17),  # (many frames: forged lines amid its data)
        "h/zzz.txt": b"one inode, three names\n",
        "keep.txt": b"never changes\n",
        "mode.txt": b"only its mode changes\n",
        "changed.txt": b"changes before the second grab\n",
    }
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    for follower in ("h/one.txt", "h/two.txt"):
        os.link(src / "h/zzz.txt", src / follower)
        files[follower] = files["h/zzz.txt"]
    (src / "d").mkdir()
    os.chmod(src / "mode.txt", 0o644)
    return files


def not_files() -> list[str]:
    """Claims for paths that are no regular file of the tree."""
    return [forged("no/such/file", WRONG["d"], 9), forged("nope", WRONG["d"], 9),
            forged("a", WRONG["c"], 9), forged("a/", WRONG["c"], 9), forged("d/", WRONG["c"], 9)]


def test_injector_puts_forged_lines_among_rsyncs_own(tmp_path: Path) -> None:
    """The injector, validated without bakgrab: a plain rsync pull through
    it (``-e`` a fake rsh that runs the injector around the server rsync),
    with and without ``-z`` and bakgrab's output options, exits 0 with the
    destination identical to the source, and its stdout holds every forged
    line, before the first file's line, amid and after the data, and right
    after a file's own line; a text without a newline put before a file's
    checksum is printed in front of that file's own line. (And the tree is
    what the other tests take it for: ``0-first.txt`` received first,
    ``h/zzz.txt`` received and the other names of its inode ``hf``.)"""
    src = tmp_path / "src"
    src.mkdir()
    files = make_tree(src)
    log, plan = tmp_path / "inject.log", tmp_path / "plan.json"
    rsh = tmp_path / "fake_rsh"
    rsh.write_text(f"#!/bin/sh\nshift\nexec {shlex.quote(sys.executable)} "
                   f"{shlex.quote(str(INJECTOR))} --plan {plan} --log {log} -- \"$@\"\n")
    rsh.chmod(0o755)
    head, every = forged("HEAD", WRONG["a"]), forged("EVERY", WRONG["b"])
    after = forged("AFTER", WRONG["c"])
    plan.write_text(json.dumps({
        "head": [head], "lines": [every], "every": 2,
        "marks": [{"sum": xxh(files["a/real.txt"]), "where": "after", "texts": [after]},
                  {"sum": xxh(files["a/big.bin"]), "where": "before", "texts": ["GLUE"]}]}))
    for extra in ([], ["-z", "--info=progress2", "--stats", "--no-human-readable",
                       "--outbuf=L"]):
        dst = tmp_path / f"dst{len(extra)}"
        log.unlink(missing_ok=True)
        done = subprocess.run(
            ["rsync", "-HaAX", *extra, "--out-format=%i %b %C|%n", "-e", str(rsh),
             f"host:{src}/", f"{dst}/"], capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert support.rsync_diff(src, dst) == []
        lines = done.stdout.replace(b"\r", b"\n").decode().splitlines()
        (run,) = [json.loads(line) for line in log.read_text().splitlines()]
        assert run["error"] is None and run["exit"] == 0 and run["marks_passed"] == 2, run
        assert run["preamble"]["protocol"] == 32, run
        assert lines.count(head.rstrip("\n")) == 1
        assert lines.count(every.rstrip("\n")) == run["injected"] - 3 >= 3
        assert lines.count(after.rstrip("\n")) == 1
        own = [i for i, line in enumerate(lines) if line.endswith("|a/real.txt")]
        assert len(own) == 1 and lines[own[0] + 1] == after.rstrip("\n")
        real = [(i, line) for i, line in enumerate(lines)
                if line.startswith(">f") and line not in (head[:-1], every[:-1], after[:-1])]
        assert real[0][1].endswith(f" {xxh(files['0-first.txt'])}|0-first.txt"), real
        assert lines.index(head.rstrip("\n")) < real[0][0]
        glued = [line for line in lines if line.endswith("|a/big.bin")]
        assert glued == [f"GLUE>f+++++++++ {glued[0].split()[1]} {xxh(files['a/big.bin'])}"
                         "|a/big.bin"], glued
        assert any(line.endswith(f" {xxh(files['h/zzz.txt'])}|h/zzz.txt") for _, line in real)
        for rel in ("h/one.txt", "h/two.txt"):
            assert [line[:2] for line in lines if line.endswith(f"|{rel}")] == ["hf"], rel
        assert lines[real[-1][0] + 1:].count(every.rstrip("\n")) >= 1


def test_injector_stops_loudly_on_a_stream_it_cannot_parse(tmp_path: Path) -> None:
    """A wrong parse of the preamble can never pass silently: a frame header
    with a tag rsync does not know ends the injector with exit 3, its reason
    on stderr and in its log, and the program it ran killed."""
    log, plan = tmp_path / "inject.log", tmp_path / "plan.json"
    plan.write_text(json.dumps({"lines": [forged("x", WRONG["a"])], "every": 1}))
    protocol, flags, seed = (32).to_bytes(4, "little"), b"\x01", b"SEED"
    bogus = (0x50 << 24 | 3).to_bytes(4, "little") + b"abc"  # (tag 0x50 - 7 = 73)
    program = [sys.executable, "-c",
               "import sys, time; sys.stdout.buffer.write(bytes.fromhex(sys.argv[1])); "
               "sys.stdout.flush(); time.sleep(60)",
               (protocol + flags + seed + bogus).hex()]
    env = {k: v for k, v in os.environ.items() if k != "SSH_ORIGINAL_COMMAND"}
    done = subprocess.run([sys.executable, str(INJECTOR), "--plan", str(plan), "--log",
                           str(log), "--", *program], capture_output=True, timeout=30, env=env)
    assert done.returncode == 3, done
    assert b"tag 73, which rsync does not know" in done.stderr
    (run,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert "tag 73" in run["error"] and run["exit"] == -9 and run["injected"] == 0
    assert done.stdout == protocol + flags + seed  # (the preamble went on; no frame did)


def test_forged_claims_never_reach_a_manifest(
    tmp_path: Path, redis_url: str, storage: Path, worker: support.Proc
) -> None:
    """Two grabs of one name by a hostile client that forges claims: a second,
    wrong claim for a received file; claims for a hard-link follower (``hf``),
    a path that does not exist and directories; and, on the second grab, for
    a file left unchanged (linked from the first snapshot) and for one whose
    mode alone changed (``cf``: a local copy, a fresh inode no checksum
    covers). The forged lines go out before the first file's data, right
    after the first file's own line (before the next file's data), before
    every frame of the sender's from then on (amid a large file's data) and
    after the last file's. Both backups exit 0 with the client's exact bytes;
    every manifest entry is the digest of the stored file; the worker did
    take rsync's checksums (``claims`` "used"), every one of them real: the
    forged lines lack the run's marker, so none counts, not even as a
    conflict that makes a file be read; the one inode refused is the "cf"
    copy, which its real line names without a checksum; verify is clean."""
    src = tmp_path / "src"
    src.mkdir()
    files = make_tree(src)
    hostile = Hostile(tmp_path)

    attack = [forged("a/real.txt", WRONG["f"]), forged("h/one.txt", WRONG["e"])]
    hostile.plan(head=not_files(), lines=not_files() + attack, every=1,
                 arm=xxh(files["0-first.txt"]),
                 marks=[{"sum": xxh(files["0-first.txt"]), "where": "after", "texts": attack}])
    first = grab(redis_url, storage, "mallory", src, hostile.env())
    assert hostile.injected() > 2 * len(not_files()) + 3 * len(attack)
    digests = checked_manifest(storage, first)
    stats = build_stats(storage, first)
    inodes = len(files) - 2  # (h/ has three names)
    assert stats["claims"] == "used", json.dumps(stats)
    # every received inode by its real claim (but the one read to prove them);
    # the forged lines, conflicting or not, count for nothing
    assert stats["claimed"] + stats["prehashed"] == inodes, json.dumps(stats)
    assert stats["claims_refused"] == 0 and stats["hashed"] == 0, json.dumps(stats)
    for rel in ("a/real.txt", "h/one.txt", "h/two.txt", "h/zzz.txt", "a/big.bin"):
        assert digests[rel] == f"xxh128:{xxh(files[rel])}", rel

    os.chmod(src / "mode.txt", 0o600)  # (same bytes, size and mtime: rsync copies it, "cf")
    (src / "changed.txt").write_bytes(b"new content, a new inode\n")
    (src / "0-first.txt").write_bytes(b"a new first file: the second grab's proof\n")
    (src / "n").mkdir()
    (src / "n/new.txt").write_bytes(b"a new file: its own claim stands\n")
    files.update({rel: (src / rel).read_bytes() for rel in ("changed.txt", "0-first.txt",
                                                           "n/new.txt")})
    attack = [forged("keep.txt", WRONG["a"]), forged("mode.txt", WRONG["b"]),
              forged("mode.txt", xxh(b"not the file")), forged("changed.txt", WRONG["f"]),
              forged("a/real.txt", WRONG["f"]), forged("h/zzz.txt", WRONG["e"])]
    hostile.plan(head=not_files(), lines=not_files() + attack, every=1,
                 arm=xxh(files["0-first.txt"]),
                 marks=[{"sum": xxh(files["0-first.txt"]), "where": "after", "texts": attack}])
    second = grab(redis_url, storage, "mallory", src, hostile.env())
    assert hostile.injected() > 2 * len(not_files()) + 2 * len(attack)
    assert stat.S_IMODE((second / "mode.txt").stat().st_mode) == 0o600
    assert (second / "keep.txt").stat().st_ino == (first / "keep.txt").stat().st_ino
    assert (second / "mode.txt").stat().st_ino != (first / "mode.txt").stat().st_ino
    digests = checked_manifest(storage, second)
    stats = build_stats(storage, second)
    # received: changed.txt, 0-first.txt and n/new.txt, by their real claims
    # (one of them read to prove them); mode.txt, a "cf" copy, read
    assert stats["claims"] == "used", json.dumps(stats)
    assert stats["claimed"] + stats["prehashed"] == 3, json.dumps(stats)
    assert stats["claims_refused"] == 1 and stats["hashed"] == 1, json.dumps(stats)
    # the linked files keep their entries: a forged line naming one is no line
    assert stats["reused"] == inodes - 3, json.dumps(stats)
    for rel in ("keep.txt", "mode.txt", "changed.txt", "a/real.txt", "h/zzz.txt", "n/new.txt"):
        assert digests[rel] == f"xxh128:{xxh(files[rel])}", rel
    verify_clean(storage)


def test_a_plain_client_gets_rsyncs_checksums(
    tmp_path: Path, redis_url: str, storage: Path, worker: support.Proc
) -> None:
    """Control: the same tree pulled by a plain client; the manifest's entry
    of every received inode is rsync's own xxh128 checksum, taken, not read
    (all but the one file read back to prove them), none refused; verify is
    clean."""
    src = tmp_path / "src"
    src.mkdir()
    files = make_tree(src)
    snap = grab(redis_url, storage, "plain", src)
    digests = checked_manifest(storage, snap)
    assert digests == {rel: f"xxh128:{xxh(data)}" for rel, data in files.items()}
    stats = build_stats(storage, snap)
    inodes = len(files) - 2  # (h/ has three names)
    assert stats["claims"] == "used" and stats["claims_refused"] == 0, json.dumps(stats)
    assert stats["claimed"] + stats["prehashed"] == inodes and stats["claimed"] >= inodes - 1
    assert stats["hashed"] == 0, json.dumps(stats)
    verify_clean(storage)


def test_a_message_glued_to_a_files_own_line_cannot_stand_for_it(
    tmp_path: Path, redis_url: str, storage: Path, worker: support.Proc
) -> None:
    """rsync prints a message's text as it is; one that does not end in a
    newline is continued by the next line rsync prints. The receiver reads a
    file's checksum after the file's progress line and before its itemized
    line: a message put right before those bytes in the stream ends up in
    front of the file's own line (``x>f+++++++++ ...|a/big.bin``), which then
    is no ``>f`` line. A forged claim for that file would then be the only
    one naming it. The file's own line still holds the run's marker where it
    begins (the client cannot know it): it is read from there, and the
    forged claim, without the marker, counts for nothing."""
    src = tmp_path / "src"
    src.mkdir()
    files = make_tree(src)
    hostile = Hostile(tmp_path)
    victims = ["a/big.bin", "changed.txt"]
    attack = [forged(rel, WRONG["f"], len(files[rel])) for rel in victims]
    hostile.plan(marks=[{"sum": xxh(files["0-first.txt"]), "where": "after", "texts": attack}]
                 + [{"sum": xxh(files[rel]), "where": "before", "texts": ["x"]}
                    for rel in victims])
    snap = grab(redis_url, storage, "glued", src, hostile.env())
    assert hostile.injected() == len(attack) + len(victims)
    assert sum(run["marks_passed"] for run in hostile.runs()) == 1 + len(victims)
    stats = build_stats(storage, snap)
    digests = checked_manifest(storage, snap)
    for rel in victims:
        assert digests[rel] == f"xxh128:{xxh(files[rel])}", (rel, stats)
    verify_clean(storage)
