"""Landlock confinement of the worker's rsync (and its ssh): a grab may touch
only its own name's paths, whatever symlinks a client stored (issue 11).

A client writes the trees the receiving rsync walks: a symlink ``d -> /x``
stored by one grab becomes ``LINKDEST/d/secret`` in the next, which rsync
resolves through the link and, with the worker's ``CAP_DAC_OVERRIDE``, would
hard-link, copy or read as a delta basis (sending its block checksums to the
client). No option of rsync prevents that, so the kernel does: the rsync
child runs in a Landlock domain that allows

* read and execute of the programs' own system trees (``/usr``, ``/lib*``,
  ``/bin``, ``/sbin``) and a handful of files of ``/etc`` that ssh and the C
  library read (``passwd``, ``hosts``, ...): never ``/etc/shadow`` nor a
  directory of ``/etc``;
* ``/dev/null`` and the random devices;
* reading the job's run dir (key, known_hosts, excludes);
* for a pull: everything inside the name's in-progress dir, and read plus
  link (``REFER``) from the ``--link-dest`` snapshot (see :data:`LINK`); for a
  restore: read of the one snapshot being pushed;
* where the kernel has Landlock's network rights (ABI 4), TCP connections to
  the request's port (and 53, DNS over TCP) only, and no listening; where it
  has scoping (ABI 6), no signals or abstract unix sockets beyond the domain.

Everything else, other names' snapshots, the storage's state dir (the request
key, pins) and the rest of the backup host, is refused by the kernel with
EACCES (or EXDEV for a link), whatever path rsync is handed. Landlock does
not restrict ``stat()``; a refused open only makes rsync transfer the file
from the client instead.

The ruleset is built in the worker (opening each allowed path with
``O_PATH|O_NOFOLLOW``), and the child, between fork and exec, only calls
``prctl(PR_SET_NO_NEW_PRIVS)`` and ``landlock_restrict_self``: two syscalls,
like the ``PR_SET_PDEATHSIG`` it already makes. Ambient capabilities survive
no_new_privs (no file capabilities are involved).

bakgrab needs Landlock ABI >= 2 (``REFER``: without it the kernel refuses
every cross-directory link, so ``--link-dest`` could link nothing). Where
the kernel lacks it the worker refuses to start, unless the operator set
``sandbox = "off"``, which ``bakgrab doctor`` and the worker's log report.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import platform
from collections.abc import Iterator
from pathlib import Path

from bakgrab.tasks.errors import ConfigError

# Syscall numbers: the same on every architecture (new syscalls share one table).
SYS_CREATE_RULESET = 444
SYS_ADD_RULE = 445
SYS_RESTRICT_SELF = 446
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1
RULE_NET_PORT = 2
PR_SET_NO_NEW_PRIVS = 38

EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5

NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

MIN_ABI = 2
"""The oldest Landlock ABI the worker accepts (REFER: links across dirs)."""

FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
"""The rights a rule on a file (not a directory) may carry."""
READ = READ_FILE | READ_DIR
RUN = READ | EXECUTE
WRITE_TREE = (READ | WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_CHAR | MAKE_DIR | MAKE_REG
              | MAKE_SOCK | MAKE_FIFO | MAKE_BLOCK | MAKE_SYM | REFER | TRUNCATE)

LINK = READ | REFER | WRITE_FILE | TRUNCATE
"""Rights on the ``--link-dest`` snapshot. Landlock lets a file be linked into
another hierarchy only if it gains no right there, so the file rights of the
in-progress dir (write, truncate) must be granted here too: rsync could
change files of the name's own newest snapshot (which a hard link shares with
the new one anyway), but never create or remove entries there, nor touch any
other name's files."""

SYSTEM_TREES = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
"""Where rsync, ssh, setpriv and their libraries live (read and execute)."""
SYSTEM_FILES = (
    "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/hosts", "/etc/host.conf",
    "/etc/resolv.conf", "/etc/gai.conf", "/etc/ld.so.cache", "/etc/ld.so.preload",
    "/etc/localtime", "/etc/services", "/etc/protocols", "/etc/ssl/openssl.cnf",
    "/dev/urandom", "/dev/random",
)
"""Single files the C library, OpenSSL and ssh read (read only)."""
DNS_PORT = 53

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def abi() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is absent or disabled."""
    if platform.system() != "Linux":
        return 0
    version = _syscall(ctypes.c_long(SYS_CREATE_RULESET), None, ctypes.c_size_t(0),
                       ctypes.c_uint32(CREATE_RULESET_VERSION))
    return max(int(version), 0)


def describe() -> str:
    """One line on what this kernel offers, for doctor and the worker's log."""
    version = abi()
    if version == 0:
        return ("this kernel has no Landlock (not built in, or not in the lsm= boot "
                "parameter)")
    parts = [f"Landlock ABI {version}"]
    if version < MIN_ABI:
        parts.append(f"(bakgrab needs >= {MIN_ABI})")
    else:
        parts.append("network rules" if version >= 4 else "no network rules (ABI < 4)")
    return " ".join(parts)


def fs_rights(version: int) -> int:
    """The filesystem rights this ABI knows (handled: everything not allowed is denied)."""
    rights = (1 << 13) - 1
    if version >= 2:
        rights |= REFER
    if version >= 3:
        rights |= TRUNCATE
    if version >= 5:
        rights |= IOCTL_DEV
    return rights


@dataclasses.dataclass
class Sandbox:
    """The paths and port one rsync child may use; :meth:`ruleset` builds it."""

    read: list[Path] = dataclasses.field(default_factory=list)
    """Directories the child may read (the run dir, a restore's snapshot)."""
    link_from: list[Path] = dataclasses.field(default_factory=list)
    """Directories the child may read and link files out of (``--link-dest``)."""
    write: list[Path] = dataclasses.field(default_factory=list)
    """Directories the child may change in any way (the pull's in-progress dir)."""
    port: int | None = None
    """The only TCP port it may connect to (where the kernel can say so)."""

    @contextlib.contextmanager
    def ruleset(self) -> Iterator[int]:
        """A Landlock ruleset fd for this sandbox, closed afterwards."""
        version = abi()
        if version < MIN_ABI:
            raise ConfigError(f"cannot confine rsync: {describe()}; see docs/security.md")
        handled = fs_rights(version)
        attr = _RulesetAttr(handled_access_fs=handled)
        size = 8
        if version >= 4 and self.port is not None:
            attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP
            size = 16
        if version >= 6:
            attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
            size = 24
        fd = int(_syscall(ctypes.c_long(SYS_CREATE_RULESET), ctypes.byref(attr),
                          ctypes.c_size_t(size), ctypes.c_uint32(0)))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_create_ruleset: {os.strerror(err)}")
        try:
            for tree in SYSTEM_TREES:
                self._allow(fd, tree, RUN & handled, optional=True)
            for file in SYSTEM_FILES:
                self._allow(fd, file, READ_FILE, optional=True)
            self._allow(fd, "/dev/null", (READ_FILE | WRITE_FILE | TRUNCATE) & handled)
            for path in self.read:
                self._allow(fd, path, READ, directory=True)
            for path in self.link_from:
                self._allow(fd, path, LINK & handled, directory=True)
            for path in self.write:
                self._allow(fd, path, WRITE_TREE & handled, directory=True)
            if attr.handled_access_net and self.port is not None:
                for port in sorted({self.port, DNS_PORT}):
                    rule = _NetPortAttr(allowed_access=NET_CONNECT_TCP, port=port)
                    self._add(fd, RULE_NET_PORT, ctypes.byref(rule), f"port {port}")
            yield fd
        finally:
            os.close(fd)

    @staticmethod
    def _allow(fd: int, path: str | Path, rights: int, optional: bool = False,
               directory: bool = False) -> None:
        # O_NOFOLLOW on the job's own dirs: the rule must be on the dir the
        # worker made, never on where a symlink of the same name points.
        flags = os.O_PATH | os.O_CLOEXEC | (os.O_DIRECTORY | os.O_NOFOLLOW if directory else 0)
        try:
            target = os.open(path, flags)
        except FileNotFoundError:
            if optional:
                return
            raise
        try:
            if not os.path.isdir(f"/proc/self/fd/{target}"):
                rights &= FILE_RIGHTS
            rule = _PathBeneathAttr(allowed_access=rights, parent_fd=target)
            Sandbox._add(fd, RULE_PATH_BENEATH, ctypes.byref(rule), str(path))
        finally:
            os.close(target)

    @staticmethod
    def _add(fd: int, kind: int, rule: object, what: str) -> None:
        done = _syscall(ctypes.c_long(SYS_ADD_RULE), ctypes.c_int(fd), ctypes.c_int(kind), rule,
                        ctypes.c_uint32(0))
        if done != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_add_rule {what}: {os.strerror(err)}")


def enter(ruleset_fd: int) -> None:
    """Confine the calling process (run in the child between fork and exec):
    only two syscalls, no allocation that could deadlock after fork."""
    if _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        os._exit(126)
    if _syscall(ctypes.c_long(SYS_RESTRICT_SELF), ctypes.c_int(ruleset_fd),
                ctypes.c_uint32(0)) != 0:
        os._exit(126)


def check_storage(storage: Path) -> None:
    """Refuse a storage inside a tree every sandbox allows (the system trees or
    /dev): a rule there would open it to every grab."""
    real = os.path.realpath(storage)
    for tree in (*SYSTEM_TREES, "/dev"):
        if os.path.exists(tree):
            base = os.path.realpath(tree)
            if real == base or real.startswith(base.rstrip("/") + "/"):
                raise ConfigError(
                    f"storage {storage} lies inside {tree}, which the rsync sandbox must let "
                    "every grab read: put the storage elsewhere (e.g. /srv/bakgrab)")


def check_available(mode: str) -> str:
    """The sandbox mode the worker will use ("landlock" or "off"), or
    ConfigError when Landlock is wanted and the kernel cannot do it."""
    if mode == "off":
        return "off"
    if mode != "landlock":
        raise ConfigError(f"sandbox: 'landlock' or 'off', not {mode!r}")
    if abi() < MIN_ABI:
        raise ConfigError(
            f"the worker confines rsync with Landlock and {describe()}. Boot a kernel with "
            "Landlock enabled (e.g. lsm=landlock,... on the kernel command line; Debian's "
            "kernels build it in), or set sandbox = \"off\" to run unconfined, which lets "
            "a hostile client read files of the backup host through its own symlinks "
            "(docs/security.md)")
    return "landlock"
