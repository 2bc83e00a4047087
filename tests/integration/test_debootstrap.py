"""Fidelity of a whole system: a real Debian root filesystem, backed up and restored.

The tree is `debootstrap --variant=minbase bookworm` from the mirror this
machine's apt already uses (read from its sources at run time, never written
down here). Building it takes minutes, so the result is kept as a tarball in a
cache dir outside the repo and unpacked into the test's tmp dir for every run
(the backup never touches the cache). Delete the tarball to rebuild it:
  ${BAKGRAB_TEST_CACHE:-${XDG_CACHE_HOME:-~/.cache}/bakgrab-tests}/debootstrap-bookworm-minbase.tar
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests import support
from tests.conftest import need_root

pytestmark = [pytest.mark.integration, pytest.mark.root]

SUITE = "bookworm"
NAME = "debian"
DEBOOTSTRAP_TIMEOUT = 360
"""Seconds a debootstrap may take before the test fails (it is ~1-3 min)."""
APT_TIMEOUT = 300
JOB_TIMEOUT = 600
# Read at import: the autouse clean_env fixture removes every BAKGRAB_* variable.
CACHE_DIR = Path(
    os.environ.get("BAKGRAB_TEST_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bakgrab-tests"
)
CACHE_TAR = CACHE_DIR / f"debootstrap-{SUITE}-minbase.tar"
TAR_META = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "--sparse"]
DEBOOTSTRAP_SCHEMES = ("http", "https", "ftp", "file")


# -- the mirror, from apt's own configuration ------------------------------------------

def _one_line_entries(text: str) -> Iterator[tuple[list[str], str, str, list[str]]]:
    """(types, uri, suite, components) of each `deb [opts] URI SUITE COMP...` line."""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, rest = line.partition(" ")
        rest = rest.strip()
        if rest.startswith("["):
            rest = rest.partition("]")[2].strip()
        words = rest.split()
        if len(words) >= 2:
            yield [kind], words[0], words[1], words[2:]


def _deb822_entries(text: str) -> Iterator[tuple[list[str], str, str, list[str]]]:
    """Each (type, URI, suite) of every enabled stanza of a deb822 .sources file."""
    stanzas: list[dict[str, str]] = [{}]
    key = ""
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if stanzas[-1]:
                stanzas.append({})
            continue
        if raw[0] in " \t" and key:
            stanzas[-1][key] += " " + raw.strip()
            continue
        key, _, value = raw.partition(":")
        key = key.strip().lower()
        stanzas[-1][key] = value.strip()
    for st in stanzas:
        if st.get("enabled", "yes").lower() == "no":
            continue
        for uri in st.get("uris", "").split():
            for suite in st.get("suites", "").split():
                yield st.get("types", "").split(), uri, suite, st.get("components", "").split()


def apt_mirror() -> str:
    """The first URI apt uses for `bookworm main` (sources.list, then sources.list.d)."""
    apt = Path("/etc/apt")
    files = [apt / "sources.list"] + sorted((apt / "sources.list.d").glob("*"))
    seen: list[str] = []
    for path in files:
        if path.suffix not in (".list", ".sources") or not path.is_file():
            continue
        seen.append(str(path))
        parse = _deb822_entries if path.suffix == ".sources" else _one_line_entries
        for types, uri, suite, components in parse(path.read_text(errors="replace")):
            if ("deb" in types and suite == SUITE and "main" in components
                    and urlsplit(uri).scheme in DEBOOTSTRAP_SCHEMES):
                return uri
    pytest.fail(f"no apt source of suite {SUITE!r} with component main (read: {seen}); "
                "this test needs the machine's Debian mirror")


def apt_proxy_env() -> dict[str, str]:
    """apt's http proxy, if it has one, for debootstrap's wget."""
    out = subprocess.run(["apt-config", "shell", "P", "Acquire::http::Proxy"],
                         capture_output=True, text=True, check=False).stdout.strip()
    if out.startswith("P="):
        proxy = out[2:].strip("'\"")
        if proxy and proxy.upper() != "DIRECT":
            return {"http_proxy": proxy}
    return {}


# -- debootstrap, cached --------------------------------------------------------------

def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (deepest first)."""
    top = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # mountinfo escapes space, tab, newline and backslash as \ooo
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])
            if point == top or point.startswith(top + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def unmount_all(path: Path) -> None:
    for point in mounts_under(path):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True)
    left = mounts_under(path)
    assert left == [], f"mounts left under {path}: {left}"


def remove_tree(path: Path) -> None:
    """rm -rf a tree that held a chroot, never across a mount still in it."""
    if path.exists():
        unmount_all(path)
        shutil.rmtree(path)


def ensure_debootstrap() -> str:
    found = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin")
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "debootstrap"]
    done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=APT_TIMEOUT)
    if done.returncode != 0:  # stale or missing package lists
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env,
                       timeout=APT_TIMEOUT)
        done = subprocess.run(install, capture_output=True, text=True, env=env,
                              timeout=APT_TIMEOUT)
    found = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin")
    if done.returncode != 0 or not found:
        pytest.fail(f"cannot install debootstrap (apt-get exit {done.returncode}):\n"
                    f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return found


def run_debootstrap(target: Path, log: Path) -> None:
    """debootstrap into ``target`` in its own process group, bounded; nothing left running
    or mounted afterwards, whatever happens."""
    program = ensure_debootstrap()
    mirror = apt_mirror()
    env = {**os.environ, **apt_proxy_env(), "DEBIAN_FRONTEND": "noninteractive",
           "LC_ALL": "C.UTF-8"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([program, "--variant=minbase", SUITE, str(target), mirror],
                                stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            code = proc.wait(DEBOOTSTRAP_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            # debootstrap is a shell script running dpkg in a chroot: stop the whole group
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            unmount_all(target)
    tail = log.read_text(errors="replace")[-3000:]
    if code is None:
        pytest.fail(f"debootstrap did not finish within {DEBOOTSTRAP_TIMEOUT}s "
                    f"(slow or unreachable mirror?); last output:\n{tail}")
    if code != 0:
        pytest.fail(f"debootstrap failed (exit {code}):\n{tail}")


def cached_rootfs(work: Path) -> Path:
    """The tarball of a minbase bookworm tree, built once (under a lock)."""
    cache = CACHE_DIR.resolve()
    assert cache != support.REPO and support.REPO not in cache.parents, \
        f"the cache {cache} must be outside the repo"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".debootstrap.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if CACHE_TAR.is_file():
            return CACHE_TAR
        build = work / "build"
        try:
            run_debootstrap(build, work / "debootstrap.log")
            partial = CACHE_TAR.with_name(CACHE_TAR.name + f".partial-{os.getpid()}")
            try:
                subprocess.run(["tar", *TAR_META, "-C", str(build), "-cf", str(partial), "."],
                               check=True, capture_output=True, timeout=300)
                partial.rename(CACHE_TAR)
            finally:
                partial.unlink(missing_ok=True)
        finally:
            remove_tree(build)
    return CACHE_TAR


@pytest.fixture
def rootfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh copy of the cached Debian tree, removed afterwards."""
    need_root()
    tar = cached_rootfs(tmp_path)
    path = tmp_path / "rootfs"
    path.mkdir()
    try:
        subprocess.run(["tar", *TAR_META, "-xpf", str(tar), "-C", str(path)],
                       check=True, capture_output=True, timeout=300)
        assert (path / "etc" / "debian_version").read_text().startswith("12"), \
            f"{tar} is not a bookworm tree: delete it to rebuild"
        yield path
    finally:
        remove_tree(path)


@pytest.fixture
def big_copies(tmp_path: Path, storage: Path) -> Iterator[Path]:
    """The staging dir; it and the snapshots are removed once the worker has stopped
    (requested before `worker`, so torn down after it)."""
    staging = tmp_path / "staging"
    staging.mkdir(mode=0o700)  # private: the client then recreates device nodes
    yield staging
    for path in (staging, storage):
        remove_tree(path)


# -- what a whole system holds ----------------------------------------------------------

def walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of everything below ``root``, no symlink followed."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            yield os.path.relpath(full, root), os.lstat(full)


def link_groups(root: Path) -> list[list[str]]:
    """Regular files with more than one name, grouped by inode."""
    groups: dict[tuple[int, int], list[str]] = {}
    for rel, st in walk(root):
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
    return sorted(sorted(g) for g in groups.values())


def specials(root: Path) -> dict[str, os.stat_result]:
    """Device nodes, FIFOs and sockets."""
    return {rel: st for rel, st in walk(root)
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            or stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode)}


def check_system_metadata(src: Path, copy: Path) -> None:
    """Setuid binaries, numeric owners and modes, merged-/usr symlinks and hard links."""
    for setuid in ("usr/bin/passwd", "usr/bin/su"):
        a, b = (src / setuid).lstat(), (copy / setuid).lstat()
        assert a.st_mode & stat.S_ISUID, f"{setuid} is not setuid in the debootstrap tree"
        assert (b.st_mode, b.st_uid, b.st_gid) == (a.st_mode, a.st_uid, a.st_gid), setuid
    shadow_gid = next(int(line.split(":")[2])
                      for line in (src / "etc" / "group").read_text().splitlines()
                      if line.startswith("shadow:"))
    shadow = (copy / "etc" / "shadow").lstat()
    assert (shadow.st_uid, shadow.st_gid, stat.S_IMODE(shadow.st_mode)) == (0, shadow_gid, 0o640)
    assert (copy / "etc" / "shadow").read_bytes() == (src / "etc" / "shadow").read_bytes()
    for link in ("bin", "sbin", "lib"):  # merged /usr
        assert (copy / link).is_symlink(), link
        assert os.readlink(copy / link) == os.readlink(src / link) == f"usr/{link}"
    groups = link_groups(src)
    assert groups, "no hard-linked file in the debootstrap tree"
    assert link_groups(copy) == groups


def test_debian_root_filesystem_backs_up_and_restores_identically(
    tmp_path: Path, rootfs: Path, big_copies: Path, redis_url: str, storage: Path,
    worker: support.Proc,
) -> None:
    """A debootstrapped Debian bookworm tree is backed up identically by
    `rsync -naHAX --numeric-ids --checksum --delete`: every file, owner, mode,
    setuid bit, device node, hard link and symlink; restored whole into a
    private staging dir it is identical again, device nodes included (made by
    the client from the worker's list, as `rrsync -wo` does not create them)."""
    nodes = specials(rootfs)
    chars = {rel: st for rel, st in nodes.items() if stat.S_ISCHR(st.st_mode)}
    assert "dev/null" in chars and chars["dev/null"].st_rdev == os.makedev(1, 3), nodes

    done = support.run_backup(redis_url, NAME, rootfs, "--json",
                              "--timeout", str(JOB_TIMEOUT - 30), timeout=JOB_TIMEOUT)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["partial"] is False and result["warnings"] == [], result
    (snap,) = support.snapshots(storage, NAME)
    assert result["snapshot"] == snap.name

    assert support.rsync_diff(rootfs, snap, "--delete") == []
    check_system_metadata(rootfs, snap)
    for rel, st in nodes.items():
        got = (snap / rel).lstat()
        assert (got.st_mode, got.st_rdev, got.st_uid, got.st_gid) == (
            st.st_mode, st.st_rdev, st.st_uid, st.st_gid), rel

    staging = big_copies
    back = subprocess.run(
        [support.BAKGRAB, "restore", "--broker", redis_url, "--name", NAME,
         "--into", str(staging), "--timeout", str(JOB_TIMEOUT - 30), "--json", "."],
        capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert back.returncode == 0, back.stderr
    restored = json.loads(back.stdout)
    assert restored["snapshot"] == snap.name
    assert restored["specials_created"] == len(nodes) and restored["specials_skipped"] == []

    # all but the staging dir itself, which keeps its own mode (issue 12)
    assert [d for d in support.rsync_diff(rootfs, staging, "--delete")
            if not d.endswith(" ./")] == []
    check_system_metadata(rootfs, staging)
    for rel, st in nodes.items():
        got = (staging / rel).lstat()
        assert (got.st_mode, got.st_rdev, got.st_uid, got.st_gid) == (
            st.st_mode, st.st_rdev, st.st_uid, st.st_gid), rel
