"""One exception tree for both sides, carrying exit codes and retry class.

Every error bakgrab raises on purpose is a :class:`BakgrabError`. The class
decides two things and nothing else does:

* ``exit_code``: what ``bakgrab`` exits with when this error ends a command
  (0 ok, 1 warning, 2 generic error, the specific codes below, 128+n for
  signal n);
* ``transient``: whether the worker retries the job (network, timeouts, a busy
  name) or fails it at once (bad request, host key mismatch, no space).

Invariants: messages say what happened and what to do, and never carry a
secret (private keys, passwords) nor the task's arguments. Constructors keep
``__init__(self, *args)`` so Celery can serialize the exception into the
result backend and rebuild it on the client.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_WARNING = 1
EXIT_ERROR = 2
EXIT_STALE = 13
"""``bakgrab status``: some name's last successful snapshot is too old."""
EXIT_DAMAGED = 14
"""``bakgrab verify``: a stored file (or a manifest) is not what the pull
stored: bit rot, or someone changed the storage (issue 15)."""
EXIT_INTERNAL = 70
"""An error bakgrab did not expect (a bug, or a case not yet turned into a
BakgrabError): never 1, which says "partial snapshot" (issue 13). 70 is
sysexits' EX_SOFTWARE, far from the specific codes above."""


class BakgrabError(Exception):
    """Something went wrong in bakgrab."""

    exit_code = EXIT_ERROR
    transient = False

    def __init__(self, *args: object) -> None:
        super().__init__(*args)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else (self.__doc__ or type(self).__name__)

    def __str__(self) -> str:
        return self.message


class ConfigError(BakgrabError):
    """The configuration is invalid."""

    exit_code = 3


class InvalidRequest(BakgrabError):
    """The job request is invalid; it is refused before anything is written."""

    exit_code = 4


class RequestRefused(InvalidRequest):
    """The request is not the name's own client's: not signed by the key
    registered for the name, or not fresh (issue 11). Its message is the same
    whether the name exists or not; nothing is written."""


class HostKeyMismatch(BakgrabError):
    """The client's sshd host key differs from the one pinned for this name."""

    exit_code = 5


class NoSpace(BakgrabError):
    """The storage cannot be given enough free space for a new snapshot."""

    exit_code = 6


class Busy(BakgrabError):
    """Another grab of the same name is running, or its client already runs
    as many jobs as ``max_jobs_per_client`` allows."""

    exit_code = 7
    transient = True


class TransferFailed(BakgrabError):
    """rsync failed in a way that retrying will not fix."""

    exit_code = 8


class TransferInterrupted(BakgrabError):
    """rsync or ssh failed in a way that a retry may fix (network, timeout)."""

    exit_code = 9
    transient = True


class JobCancelled(BakgrabError):
    """The client stopped waiting for the job before it started: nothing was
    pulled or pushed, and it is not retried (issue 13)."""

    exit_code = 15


class ClientSetupError(BakgrabError):
    """The client could not set up its side (sshd, tunnel, broker)."""

    exit_code = 10


class JobTimeout(BakgrabError):
    """The job did not reach a final state before the client's deadline."""

    exit_code = 11


class ProgramFailed(BakgrabError):
    """An external program exited non-zero.

    args: (message, program, exit code, tail of stderr)
    """

    exit_code = 12

    @property
    def returncode(self) -> int:
        return int(self.args[2]) if len(self.args) > 2 else -1

    @property
    def stderr_tail(self) -> str:
        return str(self.args[3]) if len(self.args) > 3 else ""


def exit_code_for(exc: BaseException) -> int:
    """The process exit code for an exception that ends a command: its
    BakgrabError's code, 130 for Ctrl-C, 2 for an operating-system error
    (a path, a permission), EXIT_INTERNAL for anything else."""
    if isinstance(exc, BakgrabError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return 128 + 2
    if isinstance(exc, OSError):
        return EXIT_ERROR
    return EXIT_INTERNAL
