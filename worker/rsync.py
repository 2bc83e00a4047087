"""Everything bakgrab knows about rsync: its argv, its output, its exit codes.

The pull runs ``rsync -HaAX`` with the original design's flags over ``ssh``
(``-z`` as the worker chose, issue 19: :mod:`bakgrab.worker.compress`)
to the client's one-shot sshd, whose gate runs ``rrsync -ro``. This module
builds that argv from validated values only, parses ``--info=progress2`` and
``--stats`` output, and maps exit codes to outcomes:

* 0: success; 24 (files vanished): success with a warning;
* 23 (some files could not be read): a complete snapshot marked partial,
  with the failing paths recorded (unless the storage filled up: the grab
  checks that with statvfs, see :func:`out_of_space`);
* a failure whose receiver-side errno is ENOSPC or EDQUOT: :class:`NoSpace`,
  not retried. Only rsync's own receiver lines are read for it, never the
  sender's, which quote client file names (issue 13);
* network, timeout and protocol-stream codes, and ssh's 255: transient
  (:class:`TransferInterrupted`), retried; a connection that failed before
  rsync's protocol started gets one message, whatever ssh said (refused,
  timed out, not an sshd): the client must not learn open from closed ports
  (issue 11, attack 10); the worker's log keeps ssh's words;
* the client's rsync lacking the chosen compression (it says so, and exits
  before any data): :class:`CompressRefused`, which the grab answers with one
  more run at once under rsync's own negotiation (issue 19);
* everything else: permanent (:class:`TransferFailed`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
from collections.abc import Sequence
from pathlib import Path

from bakgrab.tasks.errors import HostKeyMismatch, NoSpace, TransferFailed, TransferInterrupted
from bakgrab.worker import compress

log = logging.getLogger(__name__)

SKIP_COMPRESS = "/".join([
    # the original design's list
    # (its backslashes were for a shell; rsync's own syntax has bare [classes])
    "gz", "bz2", "t[gb]z", "tbz2", "lzma", "7z", "zip", "rar", "rpm", "deb", "iso",
    "jpg", "gif", "png", "mov", "avi", "ogg", "mp[34g]", "flv", "pdf",
    # formats that came after it
    "xz", "txz", "zst", "tzst", "lz4", "lz", "br", "jpeg", "webp", "heic", "heif", "avif",
    "mkv", "mp4", "m4a", "m4v", "webm", "opus", "flac", "jar", "apk", "whl", "docx",
    "xlsx", "pptx", "odt", "ods", "odp", "squashfs", "snap", "gpg",
])

OK = 0
SYNTAX = 1
PARTIAL = 23
VANISHED = 24
SSH_ERROR = 255

TRANSIENT_CODES = {
    5: "error starting client-server protocol",
    10: "error in socket I/O",
    12: "error in rsync protocol data stream (connection lost)",
    14: "error in IPC code",
    20: "received SIGUSR1 or SIGINT",
    21: "some error returned by waitpid()",
    22: "error allocating core memory buffers",
    30: "timeout in data send/receive",
    35: "timeout waiting for daemon connection",
    SSH_ERROR: "ssh could not connect or the connection dropped",
}
PERMANENT_CODES = {
    SYNTAX: "syntax or usage error",
    2: "protocol incompatibility",
    3: "errors selecting input/output files, dirs",
    4: "requested action not supported (refused by the client's gate?)",
    6: "daemon unable to append to log-file",
    11: "error in file I/O (is the storage full?)",
    13: "errors with program diagnostics",
    25: "the --max-delete limit stopped deletions",
}


@dataclasses.dataclass(frozen=True)
class PullSpec:
    """What one pull needs; every field already validated."""

    user: str
    address: str
    port: int
    key_file: Path
    known_hosts: Path
    host_alias: str
    exclude_file: Path
    dest: Path
    link_dest: Path | None
    timeout: int
    connect_timeout: int
    alive_interval: int
    bwlimit: str = ""
    as_root: bool = True
    """Whether the receiving rsync runs as root (else with capabilities only)."""
    compress: str = compress.ANY
    """What :func:`bakgrab.worker.compress.rsync_options` maps: ``off``,
    ``zstd:N``, ``lz4``, ``zlib:N``, or ``any`` (plain ``-z``, the original
    design's flag; issue 19)."""
    ciphers: str = ""
    """ssh's cipher preference (``-o Ciphers=``), empty for ssh's own
    (:func:`bakgrab.worker.compress.ssh_ciphers`, issue 19)."""
    backend_options: tuple[str, ...] = ()
    """The storage backend's own options (btrfs: ``--inplace --no-whole-file``, issue 14)."""


XATTR_FILTERS = [
    # Without CAP_SYS_ADMIN the receiver cannot store trusted.* or security.*
    # xattrs other than security.capability (CAP_SETFCAP): skip them
    # explicitly instead of failing every such file (first match wins).
    "--filter=+x security.capability",
    "--filter=-x security.*",
    "--filter=-x trusted.*",
]


def ssh_command(spec: PullSpec) -> list[str]:
    """The ssh argv rsync runs: the pinned host key, the one-time key, nothing else."""
    # issue 19: a preference order only; the sshd still picks among what it allows
    prefer = ["-o", f"Ciphers={spec.ciphers}"] if spec.ciphers else []
    return [
        # ssh is rsync's child, outside our reach: tie it to rsync's life so a
        # killed rsync never leaves an ssh behind.
        "setpriv", "--pdeathsig", "KILL", "--",
        "ssh", "-F", "/dev/null", "-p", str(spec.port), "-i", str(spec.key_file),
        "-o", "BatchMode=yes",
        "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none",
        "-o", "PreferredAuthentications=publickey",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={spec.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", f"HostKeyAlias={spec.host_alias}",
        "-o", "CheckHostIP=no",
        "-o", "UpdateHostKeys=no",
        "-o", f"ConnectTimeout={spec.connect_timeout}",
        "-o", f"ServerAliveInterval={spec.alive_interval}",
        "-o", "ServerAliveCountMax=3",
        "-o", "ControlMaster=no",
        "-o", "ControlPath=none",
        "-o", "ClearAllForwardings=yes",
        "-o", "ForwardAgent=no",
        "-o", "ForwardX11=no",
        "-o", "Compression=no",  # rsync -z compresses, and skips what is compressed
        *prefer,
        "-o", "LogLevel=ERROR",
    ]


def quote_for_rsh(arg: str) -> str:
    """Quote one argument of rsync's ``-e`` string (rsync splits on spaces and
    honours single quotes, but not backslashes)."""
    if "'" in arg:
        # The client sees this message: it names no path of the backup host.
        log.error("cannot run ssh for rsync: %r contains a single quote, which rsync -e "
                  "cannot carry; move the storage to a path without one", arg)
        raise TransferFailed("the backup host's storage path contains a single quote, which "
                             "rsync -e cannot carry; its operator must move the storage")
    return f"'{arg}'" if any(c in arg for c in " \t\"") else arg


def pull_argv(spec: PullSpec, marker: bytes = b"") -> list[str]:
    """The rsync argv of one pull from the client's gate into ``spec.dest``;
    ``marker`` (:func:`new_marker`) starts each of its itemized lines."""
    argv = [
        # -z and its choice apart from -HaAX: ``off`` sends no -z at all (issue 19)
        "rsync", "-HaAX", *compress.rsync_options(spec.compress),
        "--sparse", "--numeric-ids", "--super",
        f"--skip-compress={SKIP_COMPRESS}",
        # A resumed pull writes into the dir of an earlier attempt: files that
        # are gone from the client, or excluded now, must not stay behind.
        "--delete", "--delete-excluded",
        # rsync's quick check compares mtimes to the second by default: a file
        # rewritten within the same second at the same size would be linked
        # from the previous snapshot with its old content. Compare nanoseconds.
        "--modify-window=-1",
        f"--exclude-from={spec.exclude_file}",
        f"--timeout={spec.timeout}",
        "--stats", "--info=progress2", "--no-human-readable", "--outbuf=L",
        # one line per item the pull changed; ">f" lines name the files it
        # wrote, which the manifest reads first (issue 15, see ITEM_WROTE)
        "--out-format=" + (f"{marker.decode('ascii')} " if marker else "") + ITEM_FORMAT,
        "--rsh=" + " ".join(quote_for_rsh(a) for a in ssh_command(spec)),
    ]
    if not spec.as_root:
        argv += XATTR_FILTERS
    if spec.link_dest is not None:
        argv.append(f"--link-dest={spec.link_dest}")
    argv += spec.backend_options
    if spec.bwlimit:
        argv.append(f"--bwlimit={spec.bwlimit}")
    host = f"[{spec.address}]" if ":" in spec.address else spec.address
    argv += [f"{spec.user}@{host}:/", f"{spec.dest}/"]
    return argv


def push_argv(spec: PullSpec, root: Path, paths: Sequence[str]) -> list[str]:
    """The rsync argv of a restore: ``paths`` of the snapshot at ``root`` pushed,
    with their parent dirs (``--relative`` from ``root/./``), to the client's
    write-only gate."""
    argv = [
        "rsync", "-HaAX", *compress.rsync_options(spec.compress),
        "--sparse", "--numeric-ids", "--relative",
        # (no --modify-window=-1 here: rrsync -wo refuses its negative value)
        f"--skip-compress={SKIP_COMPRESS}",
        f"--timeout={spec.timeout}",
        "--stats", "--info=progress2", "--no-human-readable", "--outbuf=L",
        "--rsh=" + " ".join(quote_for_rsh(a) for a in ssh_command(spec)),
    ]
    if spec.bwlimit:
        argv.append(f"--bwlimit={spec.bwlimit}")
    argv += ["--", *(f"{root}/./{p}" for p in paths)]
    host = f"[{spec.address}]" if ":" in spec.address else spec.address
    return [*argv, f"{spec.user}@{host}:/"]


def exclude_rules(patterns: Sequence[str]) -> str:
    """The exclude file: every pattern as an explicit ``- `` rule, so no pattern
    can turn into an include, a merge or a comment."""
    return "".join(f"- {p}\n" for p in patterns)


# -- output -----------------------------------------------------------------

ITEM_FORMAT = "%i %b %C|%n"
"""rsync's itemized line of a pull (after the run's marker: :func:`new_marker`):
11 change flags, the bytes transferred,
the whole-file checksum rsync's receiver verified for a file it received
(``%C``: blank for anything else), then ``|`` and the name (unprintable bytes
escaped as ``\\#ooo``, so a name never breaks a line; the checksum is hex
or spaces, so the first ``|`` ends it whatever the name holds). ``%b``
makes rsync log a received file after its data, not before (measured with
rsync 3.4: without it the line comes first); rsync renames it into place
right after, before the next file's line (issue 15: see
:class:`bakgrab.worker.manifest.Prehasher`). The checksum may go into the
manifest instead of a read of the file (issue 19): see
:func:`bakgrab.worker.manifest.build` for when it can be trusted."""
MARKER_BYTES = 16


def new_marker() -> bytes:
    """A fresh marker for one rsync run's itemized lines (32 hex digits).

    The client's rsync can make the worker's print any text among its own
    lines (``MSG_INFO``), a whole line or, without a newline, a prefix glued
    to the next line rsync prints. rsync sends its ``--out-format`` to the
    peer only when it is the sender, never in a pull: so the client never
    learns the marker, a line it forges carries none, and a real line it
    glued something to still holds the marker, where the real line begins.
    Unguessable to the peer, not a secret of the backup host (its users see
    rsync's argv; a pull's stream is beyond their reach): the debug log
    masks it all the same."""
    return secrets.token_hex(MARKER_BYTES).encode("ascii")
ITEM_WROTE = b">f"
"""The start of the itemized line of a regular file rsync received."""
ITEM_LINKED = b"hf"
"""The start of the line of a regular file rsync hard-linked to one it
received in this pull (``-H``): no data, the other name's checksum holds."""
ITEM_NAME_AT = 12
CLAIM_LENGTH = 32
"""Hex digits of the checksum a line may claim: xxh128's, which two rsyncs
>= 3.2 negotiate. (md5 prints as many: a sample read tells them apart.)"""
_HEX = frozenset(b"0123456789abcdef")


def item(raw: bytes) -> tuple[bytes, bytes, bytes] | None:
    """The flags, checksum (hex, or b"" when blank) and (escaped) name of an
    itemized line of :data:`ITEM_FORMAT` (its marker taken off); None for
    any other line."""
    if len(raw) <= ITEM_NAME_AT or raw[ITEM_NAME_AT - 1:ITEM_NAME_AT] != b" ":
        return None
    count, _, rest = raw[ITEM_NAME_AT:].partition(b" ")
    claim, bar, name = rest.partition(b"|")
    if not bar or not name or not count.isdigit():
        return None
    claim = claim.strip(b" ")
    if claim and not (len(claim) == CLAIM_LENGTH and _HEX.issuperset(claim)):
        claim = b""  # (another checksum's length: nothing to take from it)
    return raw[:ITEM_NAME_AT - 1], claim, name


MAX_ITEM_BYTES = 256 << 20
"""The most bytes of names one pull's :class:`Items` holds. A real tree's
names fit (some 3 million of 80 bytes); lines beyond it, which a hostile
client can send without end, are dropped and the record marked incomplete
(the manifest then reads every file: the cost falls on that name alone)."""


class Items:
    """What one rsync run's itemized lines said of its regular files (issues
    15, 19): only lines that hold the run's ``marker`` count, read from it on
    (a client cannot forge them; what it glued in front is dropped).

    ``wrote``: the names of the ``>f`` lines, in rsync's order. ``claims``:
    the checksum each such line claimed, by name (b"" once two lines of a
    name disagree, or one claimed nothing). ``others``: names of regular
    files on any other line but ``hf`` (e.g. ``cf``, a local copy, whose
    inode no checksum covers). Claims all the same, checked before they
    stand for a read (:func:`bakgrab.worker.manifest.build`): an rsync is
    only as honest as it is, and a marker only as good as its secrecy."""

    def __init__(self, marker: bytes = b"", limit: int = MAX_ITEM_BYTES) -> None:
        self.marker = marker + b" " if marker else b""
        self.wrote: list[bytes] = []
        self.claims: dict[bytes, bytes] = {}
        self.others: set[bytes] = set()
        self.complete = True
        """False once lines were dropped at the limit."""
        self._room = limit

    def add(self, raw: bytes) -> tuple[bytes, bytes] | None:
        """Take one line; (name, claim) when it itemizes a received file."""
        if self.marker:
            at = raw.find(self.marker)  # (at 0 but where the client glued text on)
            if at < 0:
                return None
            raw = raw[at + len(self.marker):]
        if raw[1:2] != b"f" or raw[:2] == ITEM_LINKED:  # (a prefix test first)
            return None
        got = item(raw)
        if got is None:
            return None
        flags, claim, name = got
        self._room -= len(name)
        if self._room < 0:
            self.complete = False
            return None
        if flags[:2] != ITEM_WROTE:
            self.others.add(name)
            return None
        self.wrote.append(name)
        if self.claims.get(name, claim) != claim or not claim:
            claim = b""
        self.claims[name] = claim
        return name, claim


MAX_LINE = 1 << 20
"""The most bytes of one unterminated line :class:`Lines` holds: rsync's own
lines are far shorter (a name is at most 4 KiB, 16 KiB escaped)."""


class Lines:
    """rsync's stdout cut into lines, as bytes, whatever the reads' boundaries.

    ``--info=progress2`` ends its lines with ``\\r``, everything else with
    ``\\n``: both end a line (so ``\\r\\n`` gives an empty line between, as
    ``re.split(rb"[\\r\\n]")`` did). A line longer than one read is held
    until its end comes, but only its last :data:`MAX_LINE` bytes: the
    client can make the worker's rsync print text without end and without
    a newline (``MSG_INFO``), and a real line that ends such a run is in its
    last bytes (where its marker is). Bytes methods only, no decoding and no
    regex: a first backup prints some 60,000 lines, and the pool's Python
    read them one by one before (issue 19)."""

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines ``chunk`` completes, oldest first."""
        data = self._rest + chunk if self._rest else chunk
        if b"\r" in data:
            data = data.replace(b"\r", b"\n")
        lines = data.split(b"\n")
        self._rest = lines.pop()
        if len(self._rest) > MAX_LINE:
            self._rest = self._rest[-MAX_LINE:]
        return lines

    @property
    def rest(self) -> bytes:
        """The unterminated end of what was fed (b"" after a line end)."""
        return self._rest


def last_progress(lines: Sequence[bytes]) -> Progress | None:
    """The newest ``--info=progress2`` reading among ``lines``."""
    for raw in reversed(lines):
        if b"%" in raw:  # (every reading has one: no decode and regex for the rest)
            progress = parse_progress(raw.decode(errors="replace"))
            if progress is not None:
                return progress
    return None


PROGRESS_RE = re.compile(
    r"^\s*(?P<bytes>[\d,]+)\s+(?P<pct>\d+)%\s+(?P<rate>\S+)\s+(?P<eta>[\d:]+)"
    r"(?:\s+\(xfr#(?P<xfr>\d+),\s+(?:ir|to)-chk=(?P<left>\d+)/(?P<total>\d+)\))?"
)


@dataclasses.dataclass
class Progress:
    """One ``--info=progress2`` line."""

    bytes: int
    percent: int
    rate: str
    eta: str
    files_done: int = 0
    files_total: int = 0


def parse_progress(line: str) -> Progress | None:
    m = PROGRESS_RE.match(line)
    if not m:
        return None
    total = int(m.group("total") or 0)
    left = int(m.group("left") or 0)
    return Progress(
        bytes=int(m.group("bytes").replace(",", "")),
        percent=int(m.group("pct")),
        rate=m.group("rate"),
        eta=m.group("eta"),
        files_done=total - left,
        files_total=total,
    )


STAT_KEYS = {
    "Number of files": "files",
    "Number of created files": "created",
    "Number of deleted files": "deleted",
    "Number of regular files transferred": "files_transferred",
    "Total file size": "total_size",
    "Total transferred file size": "transferred_size",
    "Literal data": "literal",
    "Matched data": "matched",
    "Total bytes sent": "bytes_sent",
    "Total bytes received": "bytes_received",
}


def parse_stats(text: str) -> dict[str, int]:
    """The numbers of rsync's ``--stats`` block."""
    stats = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if sep and key.strip() in STAT_KEYS:
            m = re.match(r"\s*([\d,]+)", rest)
            if m:
                stats[STAT_KEYS[key.strip()]] = int(m.group(1).replace(",", ""))
    return stats


FAILED_PATH_RE = re.compile(
    r'^rsync: \[sender\] [^"]*"(?P<path>.*)"(?: failed)?: (?P<why>.+?)(?: \(\d+\))?$')


PINNED_ROOT_RE = re.compile(r"^/proc/self/fd/\d+/")


def failed_path(line: str) -> str | None:
    """The path a sender error line is about (exit 23's per-file errors),
    relative to the source (rrsync opens the source by an fd it names)."""
    m = FAILED_PATH_RE.match(line)
    return PINNED_ROOT_RE.sub("", m.group("path")) if m else None


HOST_KEY_FAILED = "Host key verification failed."
NOTHING_RECEIVED = "(0 bytes received so far)"
"""rsync's words when the connection ended before its protocol started."""
UNREACHABLE = ("the client's sshd could not be reached, or did not answer as an sshd; "
               "the grab is retried (the worker's log has ssh's own words)")
ENOSPC = "No space left on device (28)"
EDQUOT = "Disk quota exceeded (122)"
LOCAL_ROLES = ("receiver", "Receiver", "generator", "client")
"""The roles rsync tags its own (backup-host side) messages with in a pull;
the client's sender says ``[sender]`` or ``[server]``."""
LOCAL_ERROR_RE = re.compile(
    r"^rsync: \[(?:" + "|".join(LOCAL_ROLES) + r")\] .*: (?P<errno>"
    + "|".join(re.escape(t) for t in (ENOSPC, EDQUOT)) + r")$")


def out_of_space(stderr_tail: str) -> str | None:
    """The ENOSPC or EDQUOT text of a receiver-side rsync error, if any.

    Only rsync's own lines count, and only their errno, which rsync puts at
    the end of the line: a sender line may quote a client file named like an
    errno text (issue 13), and a file name cannot end a line (rsync escapes
    control characters in what it prints)."""
    for line in stderr_tail.splitlines():
        m = LOCAL_ERROR_RE.match(line.rstrip("\r"))
        if m:
            return m.group("errno")
    return None


def no_space(code: int, stderr_tail: str) -> NoSpace:
    tail = stderr_tail.strip()[-200:]
    return NoSpace(
        f"the storage filled up during the pull (rsync exit {code}); the partial data "
        f"was kept as an in-progress dir, not a snapshot. Free space or lower min_keep: {tail}"
    )


EMLINK = "Too many links (31)"
LINK_LIMIT_RE = re.compile(
    r'^rsync: \[(?:generator|receiver)\] link "(?P<new>.*)" => (?P<old>.*) failed: '
    + re.escape(EMLINK) + "$")


def at_link_limit(stderr_tail: str) -> list[str]:
    """The paths (relative to the in-progress dir) of the files rsync could
    not hard-link more files to: their inode is at the filesystem's link limit
    (ext4: 65,000). rsync 3.4-3.5 then stops with exit 2 ("File-list index ...
    not in ... (finish_hard_link)") after linking part of the group: measured
    with a source file of 33,000 links backed up twice (issue 14). A lone file
    whose --link-dest inode is at the limit is copied by rsync without a word."""
    found = []
    for line in stderr_tail.splitlines():
        m = LINK_LIMIT_RE.match(line)
        if m and m.group("old") not in found:
            found.append(m.group("old"))
    return found


class LinkLimit(TransferFailed):
    """rsync stopped because some files' inode is at the link limit (issue 14);
    the grab pulls them again as copies, so this never leaves the worker
    from a pull unless that fails too."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.paths = list(args[2]) if len(args) > 2 and isinstance(args[2], list) else []


class CompressRefused(TransferFailed):
    """The client's rsync (or its rrsync) lacks the compression the pull chose
    (issue 19); the grab runs again with plain ``-z``, so this never leaves
    the worker from a pull. Its args: the message, rsync's exit code, and
    what the client's rsync said."""

    @property
    def said(self) -> str:
        return str(self.args[2]) if len(self.args) > 2 else ""


def classify(code: int, stderr_tail: str) -> None:
    """Raise the exception for a failed exit ``code``; return for 0, 23, 24.

    A failed exit whose receiver-side errno says the storage is full (rsync
    reports that as a file I/O error, 11, or a lost connection) is NoSpace,
    not retried. Exit 23 returns: whether its files were lost to a full
    storage is for the caller to decide with the storage's own state
    (:func:`out_of_space`, then statvfs)."""
    if code in (OK, VANISHED):
        return
    tail = stderr_tail.strip()[-500:]
    if code == PARTIAL:
        return
    if out_of_space(stderr_tail) is not None:
        raise no_space(code, stderr_tail)
    # (before any data: rsync checks its options first; a later line naming
    # the words is some file's)
    said = (compress.refused(stderr_tail)
            if code != SSH_ERROR and NOTHING_RECEIVED in stderr_tail else None)
    if said is not None:
        raise CompressRefused(f"rsync exit {code}: the client's rsync refused the chosen "
                              f"compression: {said}", code, said)
    if code == SSH_ERROR and HOST_KEY_FAILED in stderr_tail:
        # ssh says so only when the key it was shown is not the pinned one:
        # someone else answers at the client's address.
        raise HostKeyMismatch(
            "the sshd at the client's address showed a host key other than the pinned one; "
            "the grab was refused. If the client's key changed legitimately, run "
            "`bakgrab trust NAME --key KEY` on the backup host (KEY: `bakgrab key` on the "
            "client)."
        )
    if code == SSH_ERROR or (code in TRANSIENT_CODES and NOTHING_RECEIVED in stderr_tail):
        # one message for refused, timed out, reset and "not an sshd" (attack 10)
        # (rsync's own exit code differs too, 255 or 12: both read as ssh's 255)
        log.warning("rsync exit %d before the transfer started: %s", code, tail)
        raise TransferInterrupted(f"ssh exit {SSH_ERROR}: {UNREACHABLE}", SSH_ERROR)
    if code in TRANSIENT_CODES:
        raise TransferInterrupted(f"rsync exit {code}: {TRANSIENT_CODES[code]}: {tail}", code)
    limit = at_link_limit(stderr_tail)
    if limit:
        raise LinkLimit(f"rsync exit {code}: {len(limit)} file(s) at the link limit: {tail}",
                        code, limit)
    why = PERMANENT_CODES.get(code, "unexpected exit code")
    raise TransferFailed(f"rsync exit {code}: {why}: {tail}", code)
