"""The one gateway through which both sides run external programs.

Every ssh, sshd, rsync and ssh-keygen child starts here, and so each one:

* gets an argv list (never a shell) with the program resolved on PATH;
* runs in its own process group (a new session) and receives SIGKILL when
  the thread that started it dies (``PR_SET_PDEATHSIG``), so a crashed or
  killed parent leaves no child behind; :meth:`Child.kill` kills the whole
  group, which takes rsync's ssh along;
* is logged at debug level with secrets masked (pass them in ``secrets``);
  secrets are never put in a child's argv or environment by bakgrab, this is
  belt and braces;
* turns a non-zero exit into :class:`ProgramFailed` carrying the code and the
  tail of stderr, where the caller asks for it;
* may be confined before it runs (``confine``: the worker's Landlock sandbox
  of rsync, issue 11), by a hook that runs in the child between fork and exec
  and must make only async-signal-safe calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import IO, Any

from bakgrab.tasks.errors import ProgramFailed

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _child_setup(parent: int) -> None:
    """Runs in the child between fork and exec: async-signal-safe calls only.

    A parent that died between the fork and the ``prctl`` sends no signal, so
    the child checks it still has that parent and otherwise dies at once."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(137)


def which(program: str) -> str:
    """Absolute path of ``program`` on PATH (sshd needs one to re-exec)."""
    if os.sep in program:
        return program
    for extra in ("", "/usr/sbin:/sbin"):
        found = shutil.which(program, path=extra or None)
        if found:
            return os.path.abspath(found)
    raise ProgramFailed(f"{program} not found; install it (see README)", program, 127, "")


def masked(argv: Sequence[str], secrets: Iterable[str] = ()) -> str:
    text = " ".join(argv)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    return text


class Child:
    """A running program in its own process group."""

    def __init__(self, popen: subprocess.Popen[bytes], argv: Sequence[str]) -> None:
        self.popen = popen
        self.argv = list(argv)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def stdin(self) -> IO[bytes] | None:
        return self.popen.stdin

    @property
    def stdout(self) -> IO[bytes] | None:
        return self.popen.stdout

    @property
    def stderr(self) -> IO[bytes] | None:
        return self.popen.stderr

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def kill(self, grace: float = 2.0) -> None:
        """SIGTERM the whole group, then SIGKILL what is left after ``grace``."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # The leader may be gone while others in its group live on (rsync's ssh).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.popen.poll() is None:
            self.kill()
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if stream:
                stream.close()


def spawn(
    argv: Sequence[str],
    *,
    stdin: Any = subprocess.DEVNULL,
    stdout: Any = subprocess.PIPE,
    stderr: Any = subprocess.PIPE,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    pass_fds: Sequence[int] = (),
    secrets: Iterable[str] = (),
    confine: Callable[[], None] | None = None,
) -> Child:
    """Start ``argv`` in its own process group; see the module docstring."""
    argv = [which(argv[0]), *argv[1:]]
    log.debug("run: %s%s", masked(argv, secrets), " (confined)" if confine else "")

    parent = os.getpid()

    def child_setup() -> None:
        _child_setup(parent)
        if confine is not None:
            confine()

    popen = subprocess.Popen(
        argv,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        pass_fds=tuple(pass_fds),
        start_new_session=True,
        preexec_fn=child_setup,  # noqa: PLW1509 -- only prctl() and the confine syscalls
        close_fds=True,
    )
    return Child(popen, argv)


def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    timeout: float | None = 60,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    secrets: Iterable[str] = (),
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to completion; ProgramFailed on non-zero exit if ``check``."""
    with spawn(
        argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        env=env, secrets=secrets,
    ) as child:
        try:
            out, err = child.popen.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            raise ProgramFailed(
                f"{os.path.basename(argv[0])} did not finish in {timeout}s", argv[0], -1, ""
            ) from None
        code = child.popen.returncode
    if check and code != 0:
        tail = err.decode(errors="replace")[-2000:]
        raise ProgramFailed(
            f"{os.path.basename(argv[0])} exited with {code}: {tail.strip()[-300:]}",
            argv[0], code, tail,
        )
    return subprocess.CompletedProcess(argv, code, out, err)
