"""The gate: the one-shot sshd's ForceCommand. Lets through a read-only pull only
(``ro``, backups), or a write-only push into a restore's staging dir (``wo``, ``wp``).

sshd runs ``python -I -m bakgrab.client.gate MODE DIR LOG`` for every session, with
the command the peer asked for in ``SSH_ORIGINAL_COMMAND``. The gate:

* refuses anything that is not ``rsync --server --sender ...`` (for ``ro``),
  anything with shell metacharacters, and ``--open-noatime``; each refusal is
  logged to LOG and told to the peer, and the gate exits 1;
* lowers its own priority (nice 19, idle I/O class) — never from the request;
* dies with its sshd session (parent-death signal) and records its process
  group for the client to kill at teardown;
* runs ``rrsync -ro -no-lock SOURCE`` (rsync's own restricted-rsync script),
  which parses the rsync options again, refuses every one that writes or
  deletes, and execs rsync; for a restore ``rrsync -wo -no-del -no-lock DIR``,
  which refuses reads and deletes and makes no device nodes or FIFOs
  (``--drop-D``). rrsync's checks are the ones that count, and they stay
  rrsync's own code;
* for a restore, refuses to run unless DIR's parent (the client's wrapper) is
  0700 and the gate's own, so nothing the receiver writes is reachable by
  another user during the transfer; and in ``wo`` mode (a staging dir that
  is not private, issue 12) takes every ``--super``/``--no-super``/
  ``--fake-super`` out of the peer's command and puts ``--fake-super`` first
  among its options: the receiving rsync then sets no owner, no
  setuid/setgid/sticky bit, no ACL and no non-``user.*`` xattr (file
  capabilities among them) for real, whatever the backup host sends; it
  records them in ``user.rsync.*`` xattrs, which the client reads for its
  report and removes. Only ``wp`` (privileged, asked for by the client for a
  private staging dir) lets the receiver apply them.

It must stay small and fast: it starts once per connection (issue 19). So one
interpreter does it all: the gate sets the idle I/O class itself with the
``ioprio_set`` syscall (``ionice`` only on an architecture whose syscall number
is not known here), and runs the installed rrsync script as ``__main__`` in
its own process, with the argv the exec would have given it, in a fresh
namespace, compiled without the gate's ``__future__`` flags; rrsync's own
``os.execlp`` then turns the gate's process into rsync, and its ``die()``
(``sys.exit(1)``) is the gate's exit 1, its message on stderr for the peer
as before, and a line in LOG. This is done only when rrsync is a Python
script whose ``#!`` interpreter is the gate's own (the same binary, so the
same Python and standard library; ``-I`` keeps user site-packages and
``PYTHONPATH`` out of it); otherwise the gate execs rrsync as a program, as
before, and notes why in LOG.
"""

from __future__ import annotations

import os
import re
import sys
import time
import types

# rsync escapes its own arguments with backslashes and may send brackets
# (--skip-compress); nothing else of a shell's syntax ever appears in a pull.
SHELL_META = re.compile(r"[;&|`$<>(){}\n\r\x00'\"!#~]")
PREFIX = {"ro": "rsync --server --sender ", "wo": "rsync --server ", "wp": "rsync --server "}
REFUSED_OPTIONS = ("--open-noatime",)
AM_ROOT_OPTIONS = ("--super", "--no-super", "--fake-super")
"""The receiver options that decide whether it acts as the super-user."""
# rrsync's own tokenizer: words, with backslash-escaped characters kept inside
WORD_RE = re.compile(r"(?:[^\s\\]+|\\.[^\s\\]*)+")


IOPRIO_SET = {"x86_64": 251, "aarch64": 30}
"""``ioprio_set``'s syscall number on the 64-bit ABIs known here (glibc has no
wrapper for it); on any other, ``ionice`` sets the I/O class, as before."""
IOPRIO_WHO_PROCESS = 1
IOPRIO_IDLE = 3 << 13
"""IOPRIO_PRIO_VALUE(IOPRIO_CLASS_IDLE, 0): what ``ionice -c 3`` sets."""


def note(log_path: str, text: str) -> None:
    try:
        with open(log_path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")
    except OSError:
        pass


def refuse(log_path: str, why: str, command: str) -> int:
    note(log_path, f"refused: {why}: {command[:500]!r}")
    sys.stderr.write(f"bakgrab gate: refused: {why}\n")
    return 1


def check(mode: str, command: str) -> str | None:
    """Why ``command`` is refused in ``mode``, or None if it may pass to rrsync."""
    if not command:
        return "no command (a shell or a session was asked for)"
    if SHELL_META.search(command):
        return "shell metacharacters in the command"
    if not command.startswith(PREFIX[mode]):
        return "only a read-only rsync pull is allowed" if mode == "ro" else "only rsync"
    if mode != "ro" and " --sender" in command:
        return "reading is not allowed"
    words = command.split()
    for word in words:
        if word.split("=", 1)[0] in REFUSED_OPTIONS:
            return f"option {word.split('=', 1)[0]} is not allowed"
    return None


def unprivileged(command: str) -> str | None:
    """``command`` with the receiver made unprivileged: ``--fake-super`` as its
    first option and every super-user option of the peer removed, wherever it
    stands (rrsync may take a "." as an option's value, so the first "." need
    not end the options; and an option's value cannot swallow a first word).
    None if no "." word is left to end the options (rrsync would refuse it)."""
    words = [w for w in WORD_RE.findall(command[len(PREFIX["wo"]):])
             if w.split("=", 1)[0] not in AM_ROOT_OPTIONS]
    if "." not in words:
        return None
    return PREFIX["wo"] + " ".join(["--fake-super", *words])


def check_staging(root: str) -> str | None:
    """Why rsync may not write into ``root``, or None: its parent must be a
    dir of the gate's user that no one else can enter (the client's wrapper)."""
    try:
        if os.path.islink(root) or not os.path.isdir(root):
            return "the staging dir is not a directory"
        st = os.stat(os.path.dirname(os.path.abspath(root)))
    except OSError as e:
        return f"the staging dir cannot be checked: {e.strerror}"
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return "the staging dir's parent is not private (0700, the gate's user's)"
    return None


def start_time(pid: int) -> str:
    """The process's start time in clock ticks: with the pid, it names one
    process for good (pids are reused, start times are not)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[19]


def die_with_session(log_path: str) -> None:
    """Be killed with the sshd session, and let the client kill our process
    group (sshd puts each session's command in a new session of its own)."""
    import ctypes

    ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    try:
        with open(os.path.join(os.path.dirname(log_path), "sessions"), "a") as f:
            f.write(f"{os.getpgid(0)} {start_time(os.getpid())}\n")
    except OSError:
        pass


def check_own_caps(mode: str) -> str | None:
    """Unprivileged, a read-only gate may hold CAP_DAC_READ_SEARCH and nothing
    more: any capability that writes would outlive rrsync's option checks."""
    if os.geteuid() == 0:
        return None
    if mode != "ro":
        return None  # a restore into the staging dir may need to set owners
    allowed = 1 << 2  # CAP_DAC_READ_SEARCH
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("CapEff:", "CapAmb:")):
                extra = int(line.split(":")[1], 16) & ~allowed
                if extra:
                    return f"the gate holds capabilities beyond a read-only pull ({extra:#x})"
    return None


def idle_io() -> bool:
    """Put this process, and the rsync it becomes, in the idle I/O class, as
    ``ionice -c 3 -t`` does (a failure is ignored, as ``-t`` ignores it).
    False if ``ioprio_set``'s number is not known for this architecture."""
    import ctypes

    number = IOPRIO_SET.get(os.uname().machine)
    # A 32-bit userland (or x32) on a 64-bit kernel has other numbers.
    if number is None or ctypes.sizeof(ctypes.c_void_p) != 8:
        return False
    arg = ctypes.c_long  # syscall(2) takes longs: an int would leave a register's top half
    ctypes.CDLL(None).syscall(arg(number), arg(IOPRIO_WHO_PROCESS), arg(0), arg(IOPRIO_IDLE))
    return True


def on_path(program: str) -> str | None:
    """The file ``os.execvp`` would run for ``program``."""
    if "/" in program:
        return program
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(folder or ".", program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def rrsync_code(path: str) -> types.CodeType | str:
    """The rrsync script at ``path`` compiled for this interpreter, or why it
    must run as a program instead: it is not a Python script whose ``#!``
    names this very interpreter (``/usr/bin/python3`` or ``/usr/bin/env
    python3``, nothing more on the line), or it does not compile."""
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError as e:
        return f"cannot read it: {e.strerror}"
    first = source.split(b"\n", 1)[0].decode(errors="replace")
    if not first.startswith("#!") or "python" not in first:
        return "not a Python script"
    words = first[2:].split()
    if len(words) == 2 and os.path.basename(words[0]) == "env":
        words = [on_path(words[1]) or words[1]]
    if len(words) != 1:
        return f"its interpreter line {first[:200]!r} is more than an interpreter"
    if os.path.realpath(words[0]) != os.path.realpath(sys.executable):
        return f"its interpreter {words[0]} is not the gate's {sys.executable}"
    try:
        # dont_inherit: the gate's own __future__ imports must not change rrsync.
        return compile(source, path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:
        return f"it does not compile here: {e}"


def run_rrsync(code: types.CodeType, argv: list[str], log_path: str, command: str) -> int:
    """Run rrsync as the script it is, in this process: as ``__main__`` in a
    namespace of its own, with ``argv``. It execs rsync, or refuses with
    ``sys.exit(1)``, which becomes the gate's exit (and a line in LOG); an
    exception it raises ends the gate as it would have ended rrsync."""
    sys.argv = argv
    main = types.ModuleType("__main__")
    main.__file__ = argv[0]
    sys.modules["__main__"] = main
    try:
        exec(code, vars(main))  # noqa: S102 -- rsync's own rrsync, from the path the client resolved
    except SystemExit as e:
        if e.code not in (None, 0):
            note(log_path, f"refused: rrsync (exit {e.code}; its reason went to the peer): "
                           f"{command[:500]!r}")
        raise
    except Exception as e:
        # Its traceback goes to the peer and the exit is 1, as rrsync's own would.
        note(log_path, f"refused: rrsync failed ({type(e).__name__}): {command[:500]!r}")
        raise
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (3, 5) or argv[0] not in PREFIX:
        sys.stderr.write("usage: python -m bakgrab.client.gate ro|wo|wp DIR LOG [IONICE RRSYNC]\n")
        return 2
    mode, root, log_path = argv[:3]
    # The client passes absolute paths, resolved before sshd's login shell had
    # a chance to change PATH (its startup files run before the gate).
    ionice, rrsync = argv[3:5] if len(argv) == 5 else ("ionice", "rrsync")
    command = os.environ.get("SSH_ORIGINAL_COMMAND", "")
    why = check(mode, command) or check_own_caps(mode)
    if why is None and mode != "ro":
        why = check_staging(root)
    if why is None and mode == "wo":
        forced = unprivileged(command)
        if forced is None:
            why = "no '.' word ends the options"
        else:
            os.environ["SSH_ORIGINAL_COMMAND"] = forced  # what rrsync reads
    if why is not None:
        return refuse(log_path, why, command)
    die_with_session(log_path)
    os.nice(19 - os.nice(0))
    # -no-del: a restore never deletes, even inside its staging dir. -no-lock
    # makes rrsync exec rsync (it would run it as a child otherwise), so the
    # parent-death signal set above carries through to rsync.
    rrsync_argv = [rrsync, *(["-ro"] if mode == "ro" else ["-wo", "-no-del"]), "-no-lock", root]
    try:
        if not idle_io():
            note(log_path, f"note: no ioprio_set known for {os.uname().machine}: exec'd ionice")
            os.execvp(ionice, [ionice, "-c", "3", "-t", *rrsync_argv])
        path = on_path(rrsync) or rrsync
        code = rrsync_code(path)
        if isinstance(code, str):
            note(log_path, f"note: rrsync {rrsync} runs as a program: {code}")
            os.execvp(rrsync, rrsync_argv)
    except OSError as e:
        return refuse(log_path, f"cannot start rrsync: {e}", command)
    return run_rrsync(code, [path, *rrsync_argv[1:]], log_path, command)


if __name__ == "__main__":
    sys.exit(main())
