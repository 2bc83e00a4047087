"""bakgrab.worker.rsync: the pull's argv, rsync's output, and what its exit codes mean.

Output parsing is checked on what a real local rsync prints, and the argv on
what a real rsync makes of it (a stand-in ``ssh`` records the argv it gets).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from bakgrab.client import gate
from bakgrab.tasks.errors import (
    BakgrabError,
    HostKeyMismatch,
    NoSpace,
    TransferFailed,
    TransferInterrupted,
)
from bakgrab.worker import rsync
from bakgrab.worker.rsync import (
    PullSpec,
    classify,
    exclude_rules,
    failed_path,
    parse_progress,
    parse_stats,
    pull_argv,
    quote_for_rsh,
)

RSYNC = shutil.which("rsync")
needs_rsync = pytest.mark.skipif(RSYNC is None, reason="rsync not installed")

ORIGINAL_SKIP_COMPRESS = [
    "gz", "bz2", "tbz2", "lzma", "7z", "zip", "rar", "rpm", "deb", "iso",
    "jpg", "gif", "png", "mov", "avi", "ogg", "flv", "pdf",
]
MODERN_SKIP_COMPRESS = [
    "xz", "zst", "lz4", "jpeg", "webp", "heic", "avif", "mkv", "mp4", "webm", "opus", "flac",
]


@pytest.fixture
def make_spec(tmp_path: Path) -> Callable[..., PullSpec]:
    def make(**changes: Any) -> PullSpec:
        run = tmp_path / "run dir"
        run.mkdir(exist_ok=True)
        values: dict[str, Any] = {
            "user": "bk",
            "address": "192.0.2.10",
            "port": 2222,
            "key_file": run / "key",
            "known_hosts": run / "known_hosts",
            "host_alias": "bakgrab-host.example.com",
            "exclude_file": run / "exclude",
            "dest": tmp_path / "dest",
            "link_dest": None,
            "timeout": 300,
            "connect_timeout": 20,
            "alive_interval": 15,
        }
        values.update(changes)
        return PullSpec(**values)

    return make


def option(argv: list[str], prefix: str) -> list[str]:
    return [a[len(prefix):] for a in argv if a.startswith(prefix)]


# -- pull_argv -----------------------------------------------------------------


def test_pull_argv_has_the_design_flags(make_spec: Callable[..., PullSpec]) -> None:
    """The pull is ``rsync -HaAX -z --numeric-ids --super`` with a mirror's
    deletes, the exclude file, the I/O timeout and parseable output (``-z``
    apart: the compress setting may drop it, issue 19)."""
    spec = make_spec(timeout=123)
    argv = pull_argv(spec)
    assert argv[:3] == ["rsync", "-HaAX", "-z"]
    for flag in ("-HaAX", "-z", "--numeric-ids", "--super", "--sparse", "--delete",
                 "--delete-excluded", "--stats", "--info=progress2", "--no-human-readable",
                 "--outbuf=L"):
        assert argv.count(flag) == 1, flag
    assert option(argv, "--exclude-from=") == [str(spec.exclude_file)]
    assert option(argv, "--timeout=") == ["123"]
    assert argv[-2:] == ["bk@192.0.2.10:/", f"{spec.dest}/"]


def test_skip_compress_keeps_original_list_and_adds_modern_formats(
    make_spec: Callable[..., PullSpec],
) -> None:
    """--skip-compress lists every suffix of the original design plus the
    already-compressed formats that came after it."""
    [value] = option(pull_argv(make_spec()), "--skip-compress=")
    suffixes = value.split("/")
    assert set(ORIGINAL_SKIP_COMPRESS) <= set(suffixes)
    assert set(MODERN_SKIP_COMPRESS) <= set(suffixes)
    assert len(suffixes) == len(set(suffixes))


def test_skip_compress_character_classes_are_unescaped(
    make_spec: Callable[..., PullSpec],
) -> None:
    """The original list's ``t[gb]z`` and ``mp[34g]`` reach rsync as rsync's own
    character classes, without backslashes."""
    [value] = option(pull_argv(make_spec()), "--skip-compress=")
    assert "\\" not in value
    assert {"t[gb]z", "mp[34g]"} <= set(value.split("/"))


def test_link_dest_only_when_given(make_spec: Callable[..., PullSpec], tmp_path: Path) -> None:
    """--link-dest names the previous snapshot when there is one, and is absent
    otherwise (a first pull)."""
    assert option(pull_argv(make_spec()), "--link-dest") == []
    prev = tmp_path / "host.2024-01-01.1704067200"
    assert option(pull_argv(make_spec(link_dest=prev)), "--link-dest=") == [str(prev)]


def test_bwlimit_only_when_set(make_spec: Callable[..., PullSpec]) -> None:
    """--bwlimit appears only when a limit is configured."""
    assert option(pull_argv(make_spec()), "--bwlimit") == []
    assert option(pull_argv(make_spec(bwlimit="10M")), "--bwlimit=") == ["10M"]


@pytest.mark.parametrize(
    ("address", "source"),
    [
        ("192.0.2.10", "bk@192.0.2.10:/"),
        ("client.example.com", "bk@client.example.com:/"),
        ("2001:db8::1", "bk@[2001:db8::1]:/"),
        ("fe80::1", "bk@[fe80::1]:/"),  # no zone id: check_address refuses "%"
    ],
)
def test_source_brackets_ipv6(
    make_spec: Callable[..., PullSpec], address: str, source: str
) -> None:
    """An IPv6 address is put in brackets so rsync does not split it at a colon."""
    assert pull_argv(make_spec(address=address))[-2] == source


def test_single_quote_in_a_path_is_refused(
    make_spec: Callable[..., PullSpec], tmp_path: Path
) -> None:
    """A path rsync's -e string cannot carry makes the argv fail loudly."""
    with pytest.raises(TransferFailed, match="single quote"):
        pull_argv(make_spec(key_file=tmp_path / "it's"))


@pytest.fixture
def fake_ssh(tmp_path: Path) -> tuple[Path, Path]:
    """A directory holding an ``ssh`` that records its argv (NUL-separated) and
    exits 255 as ssh does when it cannot connect."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "ssh-argv"
    script = bindir / "ssh"
    script.write_text(f"#!/bin/sh\nprintf '%s\\0' \"$@\" > '{log}'\nexit 255\n")
    script.chmod(0o755)
    return bindir, log


@needs_rsync
def test_rsync_hands_ssh_the_pinned_options(
    make_spec: Callable[..., PullSpec], tmp_path: Path, fake_ssh: tuple[Path, Path]
) -> None:
    """Run by a real rsync, the pull starts ssh with exactly ssh_command()'s argv
    (paths with spaces, double quotes and backslashes intact), batch mode, only
    the one-time key, strict host key checking and the timeouts; the remote
    command it asks for is a read-only pull that the client's gate lets through."""
    bindir, log = fake_ssh
    odd = tmp_path / 'odd dir "q" back\\slash'
    odd.mkdir()
    spec = make_spec(
        key_file=odd / "key file", known_hosts=odd / "known hosts", timeout=77,
        connect_timeout=9, alive_interval=4, address="2001:db8::5",
        link_dest=tmp_path / "prev snap",
    )
    spec.exclude_file.write_text(exclude_rules(["*.tmp"]))
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    done = subprocess.run(pull_argv(spec), env=env, capture_output=True, text=True, timeout=30)
    # rsync says 255 (ssh's code) or 12 (stream closed), depending on whether
    # it reaped ssh before it saw the closed pipe: both are transient.
    assert done.returncode in (12, 255), done.stderr
    with pytest.raises(TransferInterrupted):
        classify(done.returncode, done.stderr)

    got = log.read_bytes().decode().split("\0")[:-1]
    command = rsync.ssh_command(spec)
    expected_ssh = command[command.index("ssh") + 1 :]
    assert got[: len(expected_ssh)] == expected_ssh
    opts = {got[i + 1] for i, a in enumerate(got[: len(expected_ssh)]) if a == "-o"}
    assert {"BatchMode=yes", "IdentitiesOnly=yes", "StrictHostKeyChecking=yes",
            "ConnectTimeout=9", "ServerAliveInterval=4",
            f"UserKnownHostsFile={odd / 'known hosts'}"} <= opts
    assert got[got.index("-i") + 1] == str(odd / "key file")
    assert got[got.index("-p") + 1] == "2222"

    rest = got[len(expected_ssh):]
    assert rest[:3] == ["-l", "bk", "2001:db8::5"]
    remote = " ".join(rest[3:])  # ssh joins the remote command with spaces
    assert remote.startswith("rsync --server --sender ")
    assert "--timeout=77" in rest
    assert gate.check("ro", remote) is None


def test_quote_for_rsh() -> None:
    """Arguments with a space, tab or double quote are single-quoted for rsync's
    -e splitting; others pass as they are; a single quote cannot be carried."""
    assert quote_for_rsh("BatchMode=yes") == "BatchMode=yes"
    assert quote_for_rsh("/a/b\\c") == "/a/b\\c"
    assert quote_for_rsh("/a b") == "'/a b'"
    assert quote_for_rsh("/a\tb") == "'/a\tb'"
    assert quote_for_rsh('/a"b') == "'/a\"b'"
    with pytest.raises(TransferFailed, match="single quote"):
        quote_for_rsh("/a'b")


# -- excludes --------------------------------------------------------------------


def test_exclude_rules_make_every_pattern_an_exclude() -> None:
    """Each pattern becomes one ``- `` rule, even one that looks like an
    include, a merge, a comment or a list clear."""
    patterns = ["*.tmp", "+ /x", ". merge", "# c", "!", "- y", "P keep", "dir/"]
    assert exclude_rules(patterns) == "".join(f"- {p}\n" for p in patterns)
    assert exclude_rules([]) == ""


@needs_rsync
def test_exclude_rules_as_rsync_applies_them(tmp_path: Path) -> None:
    """With the exclude file, a real rsync leaves out exactly the files named by
    the patterns: '+ /x' excludes the path '+ /x' (it includes nothing),
    '. merge' and '# c' exclude files of those names (no merge file is read,
    no comment skipped), '!' excludes a file named '!' (the list is not
    cleared, so *.tmp still applies)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    for rel in ["a.tmp", "sub/b.tmp", "keep", "x", "+ /x", ". merge", "merge", "# c", "!",
                "P keep"]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    rules = tmp_path / "rules"
    rules.write_text(exclude_rules(["*.tmp", "+ /x", ". merge", "# c", "!", "P keep"]))
    subprocess.run(["rsync", "-a", f"--exclude-from={rules}", f"{src}/", f"{dst}/"], check=True,
                   timeout=30)
    copied = sorted(str(p.relative_to(dst)) for p in dst.rglob("*"))
    assert copied == ["+ ", "keep", "merge", "sub", "x"]


# -- output ----------------------------------------------------------------------


def run_rsync(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rsync", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def source_tree(tmp_path: Path) -> Path:
    """Two 300000-byte hard-linked files, a small file, a symlink, a subdir."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(300_000))
    os.link(src / "a.bin", src / "hl.bin")
    (src / "sub" / "b.txt").write_text("hello\n")
    (src / "link").symlink_to("a.bin")
    return src


def progress_lines(stdout: str) -> list[str]:
    return stdout.replace("\r", "\n").splitlines()


@needs_rsync
@pytest.mark.parametrize("human", [False, True])
def test_stats_and_progress_of_a_real_run(source_tree: Path, tmp_path: Path, human: bool) -> None:
    """parse_stats() reads rsync's --stats block and parse_progress() its
    --info=progress2 lines (with or without thousands separators); the last
    progress line agrees with the stats: all bytes and all files done."""
    args = ["-aH", "--stats", "--info=progress2", "--outbuf=L"]
    if not human:
        args.append("--no-human-readable")
    done = run_rsync([*args, f"{source_tree}/", f"{tmp_path / 'dst'}/"])
    assert done.returncode == 0, done.stderr

    stats = parse_stats(done.stdout)
    assert stats["files"] == 6  # ".", sub, a.bin, hl.bin, link, sub/b.txt
    assert stats["created"] == stats["files"]
    assert stats["deleted"] == 0
    assert stats["files_transferred"] == 2  # hl.bin is a hard link, not sent
    assert stats["total_size"] == 300_000 * 2 + len("hello\n") + len("a.bin")
    assert stats["transferred_size"] == 300_000 + len("hello\n")
    assert stats["literal"] == stats["transferred_size"]
    assert stats["matched"] == 0
    assert stats["bytes_sent"] > stats["transferred_size"]
    assert stats["bytes_received"] > 0

    parsed = [p for p in map(parse_progress, progress_lines(done.stdout)) if p is not None]
    assert parsed, done.stdout
    assert [p.bytes for p in parsed] == sorted(p.bytes for p in parsed)
    last = parsed[-1]
    assert last.bytes == stats["transferred_size"]
    assert last.files_total == stats["files"]
    assert last.files_done == last.files_total
    assert all(0 <= p.percent <= 100 for p in parsed)


@needs_rsync
def test_progress_ignores_other_lines(source_tree: Path, tmp_path: Path) -> None:
    """Lines that are not progress lines (stats, totals, blanks) parse to None."""
    done = run_rsync(["-a", "--stats", f"{source_tree}/", f"{tmp_path / 'dst'}/"])
    assert done.returncode == 0
    assert [parse_progress(line) for line in done.stdout.splitlines()] == [None] * len(
        done.stdout.splitlines()
    )


CAPTURED = (
    "sending incremental file list\n"
    "\r              0   0%    0.00kB/s    0:00:00  "
    "\r    134,217,728  24%  127.99MB/s    0:00:03  "
    "\r    536,870,912  99%  123.80MB/s    0:00:04 (xfr#3, ir-chk=1017/1032)"
    "\r    536,936,448 100%  120.04MB/s    0:00:04 (xfr#17, to-chk=0/1032)\n"
    "\n"
    "Number of files: 1,032 (reg: 1,000, dir: 31, link: 1)\n"
    "Number of created files: 1,031 (reg: 1,000, dir: 30, link: 1)\n"
    "Number of deleted files: 2 (reg: 2)\n"
    "Number of regular files transferred: 17\n"
    "Total file size: 2,147,483,648 bytes\n"
    "Total transferred file size: 536,936,448 bytes\n"
    "Literal data: 536,870,912 bytes\n"
    "Matched data: 65,536 bytes\n"
    "File list size: 32,721\n"
    "File list generation time: 0.004 seconds\n"
    "File list transfer time: 0.000 seconds\n"
    "Total bytes sent: 537,034,261\n"
    "Total bytes received: 374\n"
    "\n"
    "sent 537,034,261 bytes  received 374 bytes  119,340,974.44 bytes/sec\n"
    "total size is 2,147,483,648  speedup is 4.00\n"
)
"""A pull's stdout as rsync 3.2 prints it (human-readable numbers)."""


def test_stats_of_captured_output() -> None:
    """Every stats number is read, thousands separators removed."""
    assert parse_stats(CAPTURED) == {
        "files": 1032,
        "created": 1031,
        "deleted": 2,
        "files_transferred": 17,
        "total_size": 2_147_483_648,
        "transferred_size": 536_936_448,
        "literal": 536_870_912,
        "matched": 65_536,
        "bytes_sent": 537_034_261,
        "bytes_received": 374,
    }


def test_progress_of_captured_output() -> None:
    """Progress lines with incremental-recursion (ir-chk) and final (to-chk)
    counters give bytes, percent, rate, ETA and files done of files known."""
    parsed = [parse_progress(line) for line in progress_lines(CAPTURED)]
    found = [p for p in parsed if p is not None]
    assert [(p.bytes, p.percent, p.rate, p.eta, p.files_done, p.files_total) for p in found] == [
        (0, 0, "0.00kB/s", "0:00:00", 0, 0),
        (134_217_728, 24, "127.99MB/s", "0:00:03", 0, 0),
        (536_870_912, 99, "123.80MB/s", "0:00:04", 15, 1032),
        (536_936_448, 100, "120.04MB/s", "0:00:04", 1032, 1032),
    ]


def test_stats_of_nothing() -> None:
    """Text without a stats block gives no numbers (not zeros)."""
    assert parse_stats("") == {}
    assert parse_stats("rsync error: some error\nTotal bytes sent: lots\n") == {}


# -- reading rsync's stdout (issue 19) -------------------------------------------

LONG_NAME = b"d/" + b"n" * 150_000  # (a line longer than two reads of the pipe)
CLAIM = b"0123456789abcdef" * 2
"""A checksum as rsync prints it with ``%C`` (xxh128: 32 hex)."""
BLANK = b" " * 32
STDOUT = (
    b"receiving incremental file list\n"
    b">f+++++++++ 6 " + CLAIM + b"|a\n"
    b"\r              6   0%    0.00kB/s    0:00:00 (xfr#1, ir-chk=1002/1004)"
    b"\r          1,030  50%  500.00kB/s    0:00:00 (xfr#2, ir-chk=1001/1004)\r\n"
    b">f+++++++++ 1024 " + CLAIM + b"|" + LONG_NAME + b"\n"
    b"cd+++++++++ 0 " + BLANK + b"|d\n"
    b"\r\r>f.st...... 7 " + CLAIM + b"|odd-\\#377-\xff-bytes\n"
    b"\n"
    b"Number of files: 1,004 (reg: 1,000, dir: 4)\n"
    b"Total bytes received: 2,061\n"
    b"unterminated end"
)


def split_at(data: bytes, cuts: list[int]) -> tuple[list[bytes], bytes]:
    lines = rsync.Lines()
    got: list[bytes] = []
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        got += lines.feed(data[start:end])
    return got, lines.rest


def test_lines_do_not_depend_on_where_the_reads_end() -> None:
    """rsync's stdout cut at any byte (a \\r\\n pair torn apart, a \\r line
    end, a line longer than a read) gives the lines a split of the whole at
    every \\r and \\n gives: \\r\\n an empty line between, the unterminated
    end held back."""
    *whole, end = re.split(rb"[\r\n]", STDOUT)
    marks = [i for i, c in enumerate(STDOUT) if c in b"\r\n" and i < 400]
    cuts = sorted({0, 1, *marks, *(i + 1 for i in marks), 200, 70_000, 140_000})
    for cut in cuts:
        assert split_at(STDOUT, [cut]) == (whole, end), cut
    for size in (1, 3, 64, 4096, 65536):
        assert split_at(STDOUT, list(range(size, len(STDOUT), size))) == (whole, end), size
    assert split_at(b"", []) == ([], b"")
    assert split_at(b"x\r", []) == ([b"x"], b"")


def test_last_progress_is_the_newest_reading() -> None:
    """Of the lines of one read, the newest progress2 reading counts; other
    lines (one holding a % too) are none."""
    lines = [
        b"      1,024  10%  1.00MB/s    0:00:09 (xfr#1, to-chk=9/10)",
        b"      2,048  20%  1.00MB/s    0:00:08 (xfr#2, to-chk=8/10)",
        b">f+++++++++ 5 50% off",
        b"",
    ]
    newest = rsync.last_progress(lines)
    assert newest is not None
    assert (newest.bytes, newest.percent, newest.files_done) == (2048, 20, 2)
    assert rsync.last_progress(lines[2:]) is None
    assert rsync.last_progress([]) is None


def fake_rsync(tmp_path: Path, data: bytes, pause: float = 0.0, pieces: int = 1) -> list[str]:
    """A program that writes ``data`` to stdout in ``pieces`` writes, ``pause``
    seconds apart, as rsync does, and exits 0."""
    (tmp_path / "out").write_bytes(data)
    script = tmp_path / "fake-rsync.py"
    script.write_text(
        "import os, sys, time\n"
        f"data = open({str(tmp_path / 'out')!r}, 'rb').read()\n"
        f"n = {pieces}\n"
        "step = -(-len(data) // n)\n"
        "for i in range(0, len(data), step):\n"
        "    os.write(1, data[i:i + step])\n"
        f"    time.sleep({pause})\n")
    return [sys.executable, str(script)]


def test_run_rsync_reads_names_progress_stats_and_the_tail(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What run_rsync makes of rsync's stdout, read in pieces: every ">f"
    name in order (also to ``on_wrote``, as it comes), a progress report
    of the newest reading, and the stats from the last 64 lines (\\r or
    \\n ended, the unterminated end too), decoded with replacement."""
    from bakgrab.worker import grab

    monkeypatch.setattr(grab, "PROGRESS_EVERY", 0.0)  # (every read may report)
    tails: list[str] = []
    real_parse = rsync.parse_stats

    def parse(text: str) -> dict[str, int]:
        tails.append(text)
        return real_parse(text)

    monkeypatch.setattr(rsync, "parse_stats", parse)
    data = b"".join(b">f+++++++++ 3 %s|d/f%d\n" % (CLAIM, i) for i in range(100)) + STDOUT
    reports: list[dict[str, Any]] = []
    told: list[tuple[bytes, bytes]] = []
    outcome = grab.run_rsync(fake_rsync(tmp_path, data, pause=0.02, pieces=9),
                             reports.append, None, lambda *got: told.append(got))
    names = [b"d/f%d" % i for i in range(100)] + [b"a", LONG_NAME, b"odd-\\#377-\xff-bytes"]
    assert outcome.items.wrote == names and told == [(n, CLAIM) for n in names]
    assert outcome.items.claims == dict.fromkeys(names, CLAIM) and outcome.items.complete
    assert outcome.code == 0
    assert outcome.stats == {"files": 1004, "bytes_received": 2061}
    assert reports and reports[-1]["bytes"] == 1030 and reports[-1]["files_total"] == 1004
    tail = [raw.decode(errors="replace") for raw in re.split(rb"[\r\n]", data)[-64:]]
    assert tails == ["\n".join(tail)]


def test_run_rsync_reads_a_trickle_in_few_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rsync writes each line as it comes: run_rsync waits a moment after a
    short read, so one read takes many lines (issue 19: a read per line was
    most of the pool's CPU for reading a first backup's 60,000 lines)."""
    from bakgrab.worker import grab

    reads = []
    real_read = os.read

    def counted(fd: int, n: int) -> bytes:
        chunk = real_read(fd, n)
        reads.append(len(chunk))
        return chunk

    lines = 400
    argv = fake_rsync(tmp_path, b"".join(b">f+++++++++ 3 %s|f%d\n" % (CLAIM, i)
                                         for i in range(lines)), pause=0.001, pieces=lines)
    monkeypatch.setattr(grab.os, "read", counted)
    outcome = grab.run_rsync(argv, lambda info: None)
    monkeypatch.undo()
    assert len(outcome.items.wrote) == lines
    assert len(reads) <= lines // 4, reads


# -- failed paths (exit 23) --------------------------------------------------------


@pytest.fixture
def unreadable_tree() -> Iterator[tuple[Path, list[str]]]:
    """A source tree with an unreadable file and an unreadable directory, and the
    argv prefix that runs rsync as a user who cannot read them."""
    base = Path(tempfile.mkdtemp(prefix="bakgrab-unit-"))
    try:
        base.chmod(0o755)
        src = base / "src"
        (src / "closed").mkdir(parents=True)
        (src / "closed" / "inner").write_text("x")
        (src / "secret").write_text("secret")
        (src / "ok").write_text("ok")
        (base / "dst").mkdir()
        prefix: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv to drop privileges")
            for p in [base, *base.rglob("*")]:
                os.lchown(p, 65534, 65534)
            prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        (src / "secret").chmod(0)
        (src / "closed").chmod(0)
        yield src, prefix
    finally:
        (base / "src" / "closed").chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


@needs_rsync
def test_real_exit_23_names_the_unreadable_file(
    unreadable_tree: tuple[Path, list[str]],
) -> None:
    """A real rsync that cannot read a file exits 23, classify() lets the
    snapshot complete (partial), and failed_path() names the file."""
    src, prefix = unreadable_tree
    done = subprocess.run([*prefix, "rsync", "-a", f"{src}/", f"{src.parent / 'dst'}/"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 23, done.stderr
    classify(done.returncode, done.stderr)  # raises for anything but a success
    paths = {p for p in map(failed_path, done.stderr.splitlines()) if p}
    assert str(src / "secret") in paths
    assert (src.parent / "dst" / "ok").read_text() == "ok"


@needs_rsync
def test_real_exit_23_names_the_unreadable_directory(
    unreadable_tree: tuple[Path, list[str]],
) -> None:
    """failed_path() also names a directory the sender could not open."""
    src, prefix = unreadable_tree
    done = subprocess.run([*prefix, "rsync", "-a", f"{src}/", f"{src.parent / 'dst'}/"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 23, done.stderr
    paths = {p for p in map(failed_path, done.stderr.splitlines()) if p}
    assert str(src / "closed") in paths


needs_rrsync_and_setpriv = pytest.mark.skipif(
    not (RSYNC and shutil.which("rrsync") and shutil.which("setpriv")),
    reason="rsync, rrsync and setpriv needed",
)


@needs_rrsync_and_setpriv
def test_real_rrsync_exit_23_paths_are_relative_to_the_source(
    unreadable_tree: tuple[Path, list[str]],
) -> None:
    """Through rrsync -ro (which pins the source by an fd and so names files
    /proc/self/fd/N/...), failed_path() gives paths relative to the source."""
    src, prefix = unreadable_tree
    ssh = src.parent / "ssh"
    ssh.write_text(
        "#!/bin/sh\n"
        "# drop ssh's options up to '-l USER HOST'; what follows is the remote command\n"
        "while [ $# -gt 0 ]; do case \"$1\" in -l) shift 3; break;; *) shift;; esac; done\n"
        f'SSH_ORIGINAL_COMMAND="$*" exec rrsync -ro {src}\n'
    )
    ssh.chmod(0o755)
    done = subprocess.run([*prefix, "rsync", "-a", f"--rsh={ssh}", "bk@client:/",
                           f"{src.parent / 'dst'}/"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 23, done.stderr
    paths = {p for p in map(failed_path, done.stderr.splitlines()) if p}
    assert paths == {"secret", "closed"}, done.stderr
    assert (src.parent / "dst" / "ok").read_text() == "ok"


@pytest.mark.parametrize(
    ("line", "path"),
    [
        ('rsync: [sender] send_files failed to open "/etc/shadow": Permission denied (13)',
         "/etc/shadow"),
        ('rsync: [sender] read errors mapping "/srv/db/data file": Input/output error (5)',
         "/srv/db/data file"),
        ('rsync: [sender] send_files failed to open "/a "quoted": name": Permission denied (13)',
         '/a "quoted": name'),
        ("rsync error: some files/attrs were not transferred (see previous errors) (code 23) "
         "at main.c(1338) [sender=3.2.7]", None),
        ('rsync: [receiver] mkstemp "/dst/.x.AbCd" failed: No space left on device (28)', None),
        ('file has vanished: "/tmp/x"', None),
        ("", None),
    ],
)
def test_failed_path_of_captured_lines(line: str, path: str | None) -> None:
    """Sender errors about one file give its path; other lines give None."""
    assert failed_path(line) == path


@pytest.mark.parametrize(
    ("line", "path"),
    [
        ('rsync: [sender] opendir "/root/.cache" failed: Permission denied (13)',
         "/root/.cache"),
        ('rsync: [sender] link_stat "/srv/gone" failed: No such file or directory (2)',
         "/srv/gone"),
        ('rsync: [sender] change_dir "/srv/x y" failed: Permission denied (13)',
         "/srv/x y"),
    ],
)
def test_failed_path_of_directory_errors(line: str, path: str) -> None:
    """Sender errors about a directory or a vanished entry give its path."""
    assert failed_path(line) == path


@pytest.mark.parametrize(
    ("line", "path"),
    [
        ('rsync: [sender] opendir "/proc/self/fd/3/closed" failed: Permission denied (13)',
         "closed"),
        ('rsync: [sender] send_files failed to open "/proc/self/fd/3/secret": '
         "Permission denied (13)", "secret"),
        ('rsync: [sender] link_stat "/proc/self/fd/12/a/b c" failed: '
         "No such file or directory (2)", "a/b c"),
        ('rsync: [sender] read errors mapping "/proc/self/fd/3/srv/proc/self/fd/4/x": '
         "Input/output error (5)", "srv/proc/self/fd/4/x"),
        ('rsync: [sender] opendir "/proc/self/fdx/3/a" failed: Permission denied (13)',
         "/proc/self/fdx/3/a"),
        ('rsync: [sender] opendir "/srv/proc/self/fd/3/a" failed: Permission denied (13)',
         "/srv/proc/self/fd/3/a"),
    ],
)
def test_failed_path_strips_the_pinned_source_root(line: str, path: str) -> None:
    """rrsync pins the source by an fd, so rsync names files /proc/self/fd/N/...:
    only that leading root is stripped, leaving the path relative to the source."""
    assert failed_path(line) == path


# -- exit codes --------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 23, 24])
def test_classify_success_codes_return(code: int) -> None:
    """0 (ok), 23 (partial) and 24 (vanished files) end without an exception."""
    classify(code, "Host key verification failed.\n")  # no exception


@pytest.mark.parametrize("code", [11, 12, 255])
@pytest.mark.parametrize(
    "errno_text", ["No space left on device (28)", "Disk quota exceeded (122)"]
)
def test_classify_storage_full(code: int, errno_text: str) -> None:
    """A pull that failed because the storage filled up (ENOSPC or EDQUOT in
    the receiver's errors) is NoSpace: not retried."""
    tail = (
        f'rsync: [receiver] write failed on "/storage/.bakgrab/inprogress/h/big": {errno_text}\n'
        f"rsync error: error in file IO (code 11) at receiver.c(381) [receiver=3.2.7]\n"
    )
    with pytest.raises(NoSpace) as info:
        classify(code, tail)
    assert info.value.transient is False
    assert f"rsync exit {code}" in str(info.value)


@pytest.mark.parametrize("code", [0, 24])
def test_classify_success_ignores_errno_text(code: int) -> None:
    """A successful exit stays a success whatever stderr says."""
    classify(code, "No space left on device (28)")  # no exception


def test_classify_partial_leaves_disk_full_to_the_storage_state() -> None:
    """Exit 23 returns even with a receiver-side ENOSPC: whether the storage
    really is full is for the grab to tell from statvfs (issue 13)."""
    classify(23, 'rsync: [receiver] mkstemp "/s/.bakgrab/inprogress/h/.x.Ab" failed: '
                 "No space left on device (28)\n")  # no exception


SENDER_QUOTES = [
    # a client file named like an errno text, quoted by the sender (issue 13)
    'rsync: [sender] send_files failed to open "/proc/self/fd/3/No space left on device (28)": '
    "Permission denied (13)",
    'rsync: [sender] opendir "/proc/self/fd/3/x/Disk quota exceeded (122)" failed: '
    "Permission denied (13)",
    'file has vanished: "/proc/self/fd/3/No space left on device (28)"',
    # a sender line whose errno is ENOSPC: the client's disk, not the storage
    'rsync: [sender] write failed on "/x": No space left on device (28)',
    'rsync: [server] write failed on "/x": Disk quota exceeded (122)',
    # a receiver line about a file so named, failing for another reason
    'rsync: [receiver] rename "/s/.bakgrab/inprogress/h/.a.Xy" -> '
    '"No space left on device (28)": Permission denied (13)',
    "rsync warning: some files vanished before they could be transferred (code 24)",
]


@pytest.mark.parametrize("line", SENDER_QUOTES)
def test_out_of_space_reads_only_the_receivers_errno(line: str) -> None:
    """Only a receiver-side line whose errno (at the line's end) is ENOSPC or
    EDQUOT says the storage is full; errno text elsewhere says nothing."""
    assert rsync.out_of_space(line + "\n") is None


@pytest.mark.parametrize(("line", "errno"), [
    ('rsync: [receiver] write failed on "/s/.bakgrab/inprogress/h/big": '
     "No space left on device (28)", rsync.ENOSPC),
    ('rsync: [Receiver] mkdir "/s/.bakgrab/inprogress/h" failed: '
     "No space left on device (28)\r", rsync.ENOSPC),
    ('rsync: [generator] recv_generator: mkdir "/s/.bakgrab/inprogress/h/d" failed: '
     "Disk quota exceeded (122)", rsync.EDQUOT),
])
def test_out_of_space_of_receiver_lines(line: str, errno: str) -> None:
    """The receiver's, generator's and pre-fork receiver's own errors count."""
    assert rsync.out_of_space("rsync: [sender] something else (5)\n" + line + "\n") == errno


@pytest.mark.parametrize("code", [11, 12, 23])
def test_classify_client_file_named_like_errno_is_no_disk_full(code: int) -> None:
    """Sender lines quoting such names change nothing: 23 stays a partial
    snapshot, a failure keeps its own class (issue 13)."""
    stderr = "\n".join(SENDER_QUOTES) + "\n"
    if code == 23:
        classify(code, stderr)  # no exception
        return
    with pytest.raises(BakgrabError) as info:
        classify(code, stderr)
    assert not isinstance(info.value, NoSpace)


@pytest.mark.parametrize("code", [5, 10, 12, 14, 20, 21, 22, 30, 35])
def test_classify_transient_codes(code: int) -> None:
    """Network, timeout and protocol-stream codes are transient."""
    with pytest.raises(TransferInterrupted) as info:
        classify(code, "ssh: connect to host 192.0.2.10 port 2222: Connection timed out\n")
    assert info.value.transient is True
    assert info.value.args[1] == code
    assert f"rsync exit {code}: " in str(info.value)
    assert str(info.value).endswith("Connection timed out")


@pytest.mark.parametrize(("code", "said"), [
    (255, "ssh: connect to host 192.0.2.10 port 2222: Connection refused\r\n"),
    (255, "ssh: connect to host 192.0.2.10 port 2222: Connection timed out\r\n"),
    (255, "kex_exchange_identification: Connection closed by remote host\r\n"),
    (255, "ssh_exchange_identification: banner line contains invalid characters\r\n"),
    (12, "kex_exchange_identification: read: Connection reset by peer\r\n"
         "rsync: connection unexpectedly closed (0 bytes received so far) [Receiver]\n"),
])
def test_classify_unreachable_is_one_message(code: int, said: str) -> None:
    """Whatever ssh said before rsync started (refused, timed out, an open port
    that is no sshd), the error is one transient message that tells none of it
    (issue 11, attack 10: no port scanning through the worker)."""
    tail = said + f"rsync error: unexplained error (code {code}) at io.c(231) [Receiver=3.2.7]\n"
    with pytest.raises(TransferInterrupted) as info:
        classify(code, tail)
    assert info.value.transient is True
    assert str(info.value) == f"ssh exit 255: {rsync.UNREACHABLE}"
    assert info.value.args[1] == 255  # rsync's own code (12 or 255) would tell too


def test_classify_host_key_mismatch() -> None:
    """255 with ssh's host key failure is a HostKeyMismatch: permanent, and it
    tells what to do."""
    tail = (
        "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n"
        "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n"
        "Host key verification failed.\r\n"
        "rsync: connection unexpectedly closed (0 bytes received so far) [Receiver]\n"
        "rsync error: unexplained error (code 255) at io.c(231) [Receiver=3.2.7]\n"
    )
    with pytest.raises(HostKeyMismatch, match="bakgrab trust NAME") as info:
        classify(255, tail)
    assert info.value.transient is False
    assert info.value.exit_code == 5


@pytest.mark.parametrize("code", [1, 2, 3, 4, 6, 11, 13, 25, 7, 99, 127, -9])
def test_classify_permanent_codes(code: int) -> None:
    """Syntax, protocol, file-selection, refused, file I/O and unknown codes are
    permanent TransferFailed, even with the host key message (not 255)."""
    with pytest.raises(TransferFailed) as info:
        classify(code, "Host key verification failed.")
    assert type(info.value) is TransferFailed
    assert info.value.transient is False
    assert info.value.args[1] == code
    assert str(info.value).startswith(f"rsync exit {code}: ")


def test_classify_keeps_only_the_tail_of_stderr() -> None:
    """The message carries at most the last 500 characters of stderr."""
    stderr = "A" * 5000 + "the end"
    with pytest.raises(TransferInterrupted) as info:
        classify(12, stderr)
    assert str(info.value).endswith("A" * 493 + "the end")
    assert len(str(info.value)) < 600


def raised(code: int, stderr: str) -> BakgrabError:
    try:
        classify(code, stderr)
    except BakgrabError as e:
        return e
    raise AssertionError(f"classify({code}) returned")


CASES = [
    (12, "connection lost"),
    (255, "Host key verification failed."),
    (11, "disk broken"),
    (11, "No space left on device (28)"),
]


@pytest.mark.parametrize(("code", "stderr"), CASES)
def test_exceptions_survive_pickle(code: int, stderr: str) -> None:
    """A classified exception pickled and loaded keeps its class, args, message,
    exit code and retry class."""
    exc = raised(code, stderr)
    back = pickle.loads(pickle.dumps(exc))  # noqa: S301 -- our own bytes
    assert type(back) is type(exc)
    assert back.args == exc.args
    assert str(back) == str(exc)
    assert (back.exit_code, back.transient) == (exc.exit_code, exc.transient)


@pytest.mark.parametrize(("code", "stderr"), CASES)
def test_exceptions_survive_celery_json_results(code: int, stderr: str) -> None:
    """Through Celery's JSON result encoding (what the client receives), a
    classified exception comes back as the same class with the same args."""
    app = Celery("unit", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.result_serializer = "json"
    exc = raised(code, stderr)
    encoded = json.loads(json.dumps(app.backend.prepare_exception(exc)))
    back = app.backend.exception_to_python(encoded)
    assert type(back) is type(exc)
    assert tuple(back.args) == exc.args
    assert (back.exit_code, back.transient) == (exc.exit_code, exc.transient)


def test_only_lines_holding_the_runs_marker_count() -> None:
    """issue 19: a line the client forged has no marker and counts for
    nothing; a real line the client glued text in front of (a message
    without a newline) is read from its marker on; the marker is in the
    pull's --out-format, fresh for every run."""
    marker = rsync.new_marker()
    assert len(marker) == 32 and marker != rsync.new_marker()
    items = rsync.Items(marker)
    wrong = b"f" * 32
    assert items.add(b">f+++++++++ 3 " + wrong + b"|a") is None  # forged
    assert items.add(b"x" + marker + b" >f+++++++++ 3 " + CLAIM + b"|a") == (b"a", CLAIM)
    assert items.add(marker + b" >f+++++++++ 3 " + CLAIM + b"|b|c") == (b"b|c", CLAIM)
    assert items.add(marker + b" cf......... 0 " + BLANK + b"|copy") is None
    assert items.add(marker[:-1] + b" >f+++++++++ 3 " + wrong + b"|b|c") is None
    assert items.wrote == [b"a", b"b|c"] and items.claims == {b"a": CLAIM, b"b|c": CLAIM}
    assert items.others == {b"copy"}
    spec = rsync.PullSpec(user="u", address="127.0.0.1", port=22, key_file=Path("k"),
                          known_hosts=Path("kh"), host_alias="h", exclude_file=Path("x"),
                          dest=Path("d"), link_dest=None, timeout=60, connect_timeout=10,
                          alive_interval=15)
    assert f"--out-format={marker.decode()} {rsync.ITEM_FORMAT}" in rsync.pull_argv(spec, marker)
    assert f"--out-format={rsync.ITEM_FORMAT}" in rsync.pull_argv(spec)


def test_text_without_end_is_held_only_in_its_last_bytes() -> None:
    """A client can make the worker's rsync print text without a newline for
    as long as it likes: Lines holds at most MAX_LINE bytes of it, and the
    real line that ends it is still read, from its marker on."""
    marker = rsync.new_marker()
    lines = rsync.Lines()
    flood = b"x" * 65536
    for _ in range(80):  # 5 MiB, read by read, never a line end
        assert lines.feed(flood) == []
        assert len(lines.rest) <= rsync.MAX_LINE
    real = marker + b" >f+++++++++ 3 " + CLAIM + b"|a/file"
    [glued] = lines.feed(real + b"\n")
    assert len(glued) <= rsync.MAX_LINE + len(real) and glued.endswith(real)
    items = rsync.Items(marker)
    assert items.add(glued) == (b"a/file", CLAIM)
