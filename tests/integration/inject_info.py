"""A hostile rsync sender for tests: the real one, with forged MSG_INFO lines in its stream.

::

    inject_info.py --plan PLAN.json --log LOG.json -- PROGRAM [ARGS...]

runs PROGRAM (the real ``rrsync``, or ``rsync --server --sender ...``) with
this process's stdin and stderr and its stdout piped here, and forwards that
stdout byte for byte, except that once the protocol preamble is past it
parses the multiplexed stream into frames (4-byte little-endian header
``((MPLEX_BASE + tag) << 24) | length``, then ``length`` bytes) and puts
frames of its own between them: MSG_INFO (tag 2) frames, whose text the
receiving rsync prints on its stdout among its own itemized lines, which is
what a compromised client can do to a pull (issue 19).

The plan (JSON), every text one MSG_INFO frame:

``head``: texts put in before the sender's first frame (before any file's data).
``lines`` and ``every``: texts put in before every ``every``-th frame
(counting from the first), once ``arm`` (a checksum, below) has passed, or
from the start without one: so between and amid files' data, and after the
last one's.
``marks``: ``[{"sum": HEX, "where": "before"|"after", "texts": [...]}]``:
texts put in just before or just after the bytes of a file's whole-file
checksum in the data stream (HEX: xxh128 hex as rsync prints it with ``%C``;
rsync sends its bytes in reverse), splitting the MSG_DATA frame that holds
them. The receiver reads that checksum after it printed the file's progress
line and before it prints the file's itemized line, and goes on to read
past it only after printing that line: "before" comes right in front of
the file's own line, "after" right behind it.

A text ending in ``\n`` is one line as rsync prints it; one without is
printed with nothing after it, so the next line rsync prints continues it.

The preamble (protocol >= 30, rsync's compat.c ``setup_protocol``): the
server's protocol version (int32), its compat flags (varint; the server
writes a plain byte when the client's ``-e`` info holds the pre-release
``V``), then, when the flags hold CF_VARINT_FLIST_FLAGS (negotiated
strings), its checksum list unless ``--checksum-choice`` was given and its
compress list when compressing without ``--compress-choice`` (vstrings), then
the checksum seed (int32). Multiplexing starts right after (main.c
``start_server``). Which lists come is read from the server's command line
(PROGRAM's argv when it holds ``--server``, else ``SSH_ORIGINAL_COMMAND``,
what rrsync reads); a list that is not words of lowercase letters and
digits, or a frame header with a tag rsync does not know, means the parse
went wrong: the program is killed, the reason goes to stderr and the log,
and this exits 3.

The log (a JSON line appended when the stream ends): frames seen by tag, MSG_INFO
frames injected, marks passed, the preamble as parsed, the error if
any, PROGRAM's exit code. Exit: PROGRAM's exit code (128 + n for a signal).
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
from typing import Any

MPLEX_BASE = 7
MSG_DATA, MSG_INFO = 0, 2
KNOWN_TAGS = frozenset({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 22, 33, 42, 86, 100, 101, 102})
"""rsync.h's ``enum msgcode``: any other tag is a misparse."""
CF_VARINT_FLIST_FLAGS = 1 << 7
MAX_MSG = 4000
"""Below rsync's message buffer (BIGPATHBUFLEN): a longer MSG_INFO ends the pull."""
VARINT_EXTRA = [0] * 32 + [1] * 16 + [2] * 8 + [3] * 4 + [4] * 2 + [5, 6]
"""io.c's ``int_byte_extra``: extra bytes of a varint, by its first byte / 4."""
NAME_LIST = re.compile(rb"[a-z0-9]+( [a-z0-9]+)*")


class Misparse(Exception):
    """The stream is not what the parse expected: never forward a guess."""


def server_words(argv: list[str]) -> list[str]:
    """The server rsync's command line: argv itself, or what rrsync will run."""
    if "--server" in argv:
        return argv
    return shlex.split(os.environ.get("SSH_ORIGINAL_COMMAND", ""))


def expected_lists(words: list[str]) -> tuple[bool, bool, bool]:
    """(client info holds 'v', holds 'V', compress list sent) from the options
    before the first argument that is not one; the checksum list is told
    apart by :func:`checksum_list_sent`."""
    client_info = ""
    compress = compress_choice = False
    for word in words[1:]:
        if word == "." or not word.startswith("-"):
            break
        if word.startswith("--"):
            name = word[2:].partition("=")[0]
            if name == "compress":
                compress = True
            elif name in ("compress-choice", "zc", "new-compress", "old-compress"):
                compress = compress_choice = True
            continue
        letters = word[1:]
        head, e, info = letters.partition("e")
        if "z" in head:
            compress = True
        if e:
            client_info = info
    return "v" in client_info, "V" in client_info, compress and not compress_choice


def checksum_list_sent(words: list[str]) -> bool:
    for word in words[1:]:
        if word == "." or not word.startswith("-"):
            break
        if word.partition("=")[0] in ("--checksum-choice", "--cc"):
            return False
    return True


class Stream:
    """Parses the sender's stdout and writes it, with the plan's frames, to fd 1."""

    def __init__(self, plan: dict[str, Any], words: list[str]) -> None:
        self.head = texts(plan.get("head", []))
        self.lines = texts(plan.get("lines", []))
        self.every = int(plan.get("every", 0))
        self.armed = plan.get("arm") is None
        self.arm = bytes.fromhex(plan["arm"])[::-1] if plan.get("arm") else None
        self.marks = [(bytes.fromhex(m["sum"])[::-1], m["where"] == "after", texts(m["texts"]))
                      for m in plan.get("marks", [])]
        if self.arm is not None:
            self.marks.append((self.arm, True, []))
        self.marks_due = list(range(len(self.marks)))
        negotiated, prerelease, compress_list = expected_lists(words)
        self.want_checksum_list = checksum_list_sent(words)
        self.want_compress_list = compress_list
        self.byte_flags = prerelease
        self.words_negotiate = negotiated
        self.buf = bytearray()
        self.preamble_done = False
        self.frames = 0
        self.tags: dict[str, int] = {}
        self.injected = 0
        self.marked = 0
        self.preamble: dict[str, Any] = {}
        self.lists_due: list[bool] = []
        self.tail = b""  # the last bytes of MSG_DATA payload, for a checksum across frames

    # -- output ----------------------------------------------------------------

    @staticmethod
    def out(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(1, view)
            except BlockingIOError:
                # (our stdout may be the socket rsync made non-blocking as its
                # stdin: one open file, shared)
                select.select([], [1], [])
                continue
            view = view[n:]

    @staticmethod
    def frame(tag: int, payload: bytes) -> bytes:
        return ((MPLEX_BASE + tag) << 24 | len(payload)).to_bytes(4, "little") + payload

    def inject(self, texts: list[bytes]) -> None:
        self.out(b"".join(self.frame(MSG_INFO, text) for text in texts))
        self.injected += len(texts)

    # -- parsing ---------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        self.buf += chunk
        while not self.preamble_done:
            # (each field goes on as soon as it is whole: the two sides answer
            # each other during the preamble, holding one back would hang both)
            took = self.preamble_field()
            if took is None:
                return
            self.out(bytes(self.buf[:took]))
            del self.buf[:took]
        self.parse_frames()

    def preamble_field(self) -> int | None:
        """The length of the preamble's next field once it is whole, else None."""
        buf, info = self.buf, self.preamble
        if "protocol" not in info:
            if len(buf) < 4:
                return None
            info["protocol"] = protocol = int.from_bytes(buf[0:4], "little")
            if not 30 <= protocol <= 40:
                raise Misparse(f"protocol {protocol}: not one this parse knows (30 and up)")
            return 4
        if "compat_flags" not in info:
            if not buf:
                return None
            if self.byte_flags:
                flags, took = buf[0], 1
            else:
                extra = VARINT_EXTRA[buf[0] // 4]
                if len(buf) < 1 + extra:
                    return None
                value = bytearray(buf[1:1 + extra]) + b"\0" * 5
                value[extra] = buf[0] & ((1 << (8 - extra)) - 1) if extra else buf[0]
                flags, took = int.from_bytes(value[:4], "little"), 1 + extra
            info["compat_flags"] = flags
            negotiated = bool(flags & CF_VARINT_FLIST_FLAGS)
            if negotiated != self.words_negotiate:
                raise Misparse(f"compat flags {flags:#x} disagree with the client info "
                               f"(negotiated strings: {self.words_negotiate})")
            self.lists_due = [want for want in (self.want_checksum_list,
                                                self.want_compress_list) if want and negotiated]
            info["lists"] = []
            return took
        if self.lists_due:
            if not buf:
                return None
            length, head = buf[0], 1
            if length & 0x80:
                if len(buf) < 2:
                    return None
                length, head = (length & 0x7F) << 8 | buf[1], 2
            if len(buf) < head + length:
                return None
            text = bytes(buf[head:head + length])
            if not NAME_LIST.fullmatch(text):
                raise Misparse(f"not a list of names: {text[:80]!r}")
            info["lists"].append(text.decode())
            self.lists_due.pop()
            return head + length
        if len(buf) < 4:
            return None
        info["seed"] = int.from_bytes(buf[0:4], "little")
        self.preamble_done = True
        return 4

    def parse_frames(self) -> None:
        while len(self.buf) >= 4:
            header = int.from_bytes(self.buf[:4], "little")
            tag, length = (header >> 24) - MPLEX_BASE, header & 0xFFFFFF
            if tag not in KNOWN_TAGS:
                raise Misparse(f"frame {self.frames}: header {header:#010x} has tag {tag}, "
                               "which rsync does not know: the preamble parse went wrong")
            if len(self.buf) < 4 + length:
                return
            payload = bytes(self.buf[4:4 + length])
            del self.buf[:4 + length]
            if not self.frames:
                self.inject(self.head)
            if self.armed and self.every and self.frames % self.every == 0:
                self.inject(self.lines)
            self.frames += 1
            self.tags[str(tag)] = self.tags.get(str(tag), 0) + 1
            if tag == MSG_DATA and self.marks_due:
                self.forward_data(payload)
            else:
                self.out(self.frame(tag, payload))

    def forward_data(self, payload: bytes) -> None:
        """A MSG_DATA frame, split at each awaited checksum it holds."""
        seen = self.tail + payload
        cuts: list[tuple[int, int, list[bytes]]] = []
        for i in list(self.marks_due):
            sums, after, extra = self.marks[i]
            at = seen.find(sums)
            if at < 0:
                continue
            self.marks_due.remove(i)
            # (a checksum that began in the frame before: "before" goes inside
            # it, which is as good, the receiver reads it in one go)
            cut = at - len(self.tail) + (len(sums) if after else 0)
            cuts.append((max(0, cut), i, extra))
        last = 0
        for cut, i, extra in sorted(cuts):
            if cut > last:
                self.out(self.frame(MSG_DATA, payload[last:cut]))
            self.inject(extra)
            self.marked += 1
            if self.marks[i][0] == self.arm:
                self.armed = True
            last = cut
        if last < len(payload) or not payload:
            self.out(self.frame(MSG_DATA, payload[last:]))
        self.tail = seen[-15:]


def texts(values: list[str]) -> list[bytes]:
    """The plan's texts as bytes, each a message rsync prints as it is."""
    out = [str(v).encode("utf-8", "surrogateescape") for v in values]
    for text in out:
        # (rsync escapes a newline inside a message: only a last one ends a line)
        if b"\n" in text[:-1] or len(text) > MAX_MSG:
            raise ValueError(f"not a text rsync prints as it is: {text[:80]!r}")
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 6 or argv[0] != "--plan" or argv[2] != "--log" or argv[4] != "--":
        sys.stderr.write("usage: inject_info.py --plan PLAN.json --log LOG.json -- PROGRAM...\n")
        return 2
    plan_path, log_path, program = argv[1], argv[3], argv[5:]
    with open(plan_path) as f:
        plan = json.load(f)
    stream = Stream(plan, server_words(program))
    child = subprocess.Popen(program, stdout=subprocess.PIPE)
    assert child.stdout is not None
    error = None
    try:
        while True:
            chunk = os.read(child.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            stream.feed(chunk)
        if stream.buf:  # (the sender died mid-frame: pass on what it wrote)
            stream.out(bytes(stream.buf))
    except BrokenPipeError:
        error = "the receiving side closed the connection"
    except Exception as e:  # (a misparse, or a bug here: never a half-forwarded guess)
        error = f"{type(e).__name__}: {e}"
        sys.stderr.write(f"inject_info: {error}\n")
        child.send_signal(signal.SIGKILL)
    finally:
        child.stdout.close()  # (a sender still writing gets EPIPE, not a hang)
        code = child.wait()
        record = {"frames": stream.frames, "tags": stream.tags, "injected": stream.injected,
                  "marks_passed": stream.marked, "preamble": stream.preamble, "error": error,
                  "exit": code, "pid": os.getpid()}
        # one line per connection, in one write (a backup may open more than one)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)
    if error is not None and not error.startswith("the receiving"):
        return 3
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
