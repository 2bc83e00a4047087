"""Linux capabilities: what each side needs instead of root, checked at start.

* A client not running as root needs ``CAP_DAC_READ_SEARCH`` (ambient) so its
  rsync sender reads every file, and nothing else.
* A worker not running as root needs :data:`WORKER_CAPS` (ambient) so rsync
  ``--super`` stores owners, modes, ACLs, xattrs, devices and file
  capabilities. The worker clears its own *effective* set at start and raises
  a capability only around the few file operations that need it
  (:func:`raised`); rsync and rm get them through the ambient set on exec.

Capability sets are per thread; the worker's pool processes are forked from
the thread that dropped them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
from collections.abc import Iterable, Iterator

NAMES = {
    "chown": 0, "dac_override": 1, "dac_read_search": 2, "fowner": 3, "fsetid": 4,
    "kill": 5, "setgid": 6, "setuid": 7, "setpcap": 8, "net_bind_service": 10,
    "net_admin": 12, "net_raw": 13, "sys_chroot": 18, "sys_ptrace": 19, "sys_admin": 21,
    "sys_resource": 24, "mknod": 27, "audit_write": 29, "setfcap": 31,
}
WORKER_CAPS = ("chown", "dac_override", "fowner", "fsetid", "mknod", "setfcap")
CLIENT_CAPS = ("dac_read_search",)
_VERSION_3 = 0x20080522


def sets(pid: str = "self") -> dict[str, int]:
    """The capability sets of a process, as bit masks (``eff``, ``prm``, ...)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Cap"):
                key, value = line.split(":")
                out[key[3:].lower()] = int(value, 16)
    return out


def names_in(mask: int) -> list[str]:
    return sorted(n for n, bit in NAMES.items() if mask >> bit & 1) + [
        f"cap_{bit}" for bit in range(64) if mask >> bit & 1 and bit not in NAMES.values()]


def missing_ambient(wanted: Iterable[str]) -> list[str]:
    """The capabilities of ``wanted`` not in this process's ambient set."""
    amb = sets().get("amb", 0)
    return [n for n in wanted if not amb >> NAMES[n] & 1]


def how_to_grant(wanted: Iterable[str]) -> str:
    caps = " ".join(f"CAP_{n.upper()}" for n in wanted)
    plus = ",".join(f"+{n}" for n in wanted)
    return (f"grant them with AmbientCapabilities={caps} in the systemd unit (see deploy/), "
            f"or start it with `setpriv --inh-caps {plus} --ambient-caps {plus} ...` as root")


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _capget() -> tuple[int, int, int]:
    header = _Header(_VERSION_3, 0)
    data = (_Data * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    join = lambda field: getattr(data[0], field) | getattr(data[1], field) << 32  # noqa: E731
    return join("effective"), join("permitted"), join("inheritable")


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    header = _Header(_VERSION_3, 0)
    data = (_Data * 2)()
    for i, shift in ((0, 0), (1, 32)):
        data[i].effective = effective >> shift & 0xFFFFFFFF
        data[i].permitted = permitted >> shift & 0xFFFFFFFF
        data[i].inheritable = inheritable >> shift & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def drop_effective() -> None:
    """Clear this thread's effective set; permitted, inheritable and ambient
    stay, so programs it execs still receive the ambient capabilities."""
    if os.geteuid() == 0:
        return
    _, permitted, inheritable = _capget()
    _capset(0, permitted, inheritable)


@contextlib.contextmanager
def raised(*wanted: str) -> Iterator[None]:
    """Make ``wanted`` effective for the block, if permitted (no-op for root)."""
    if os.geteuid() == 0:
        yield
        return
    effective, permitted, inheritable = _capget()
    mask = 0
    for name in wanted:
        mask |= 1 << NAMES[name]
    _capset(effective | (mask & permitted), permitted, inheritable)
    try:
        yield
    finally:
        _capset(effective, permitted, inheritable)


MIN_RSYNC = (3, 4)
"""rsync before 3.4 has the 2025 remote-code-execution and file-leak flaws
(CVE-2024-12084..12088): bakgrab refuses it on both ends."""


def rsync_version(rsync: str = "rsync") -> tuple[int, ...]:
    from bakgrab.tasks import process

    out = process.run([shutil.which(rsync) or rsync, "--version"], timeout=10).stdout.decode()
    first = out.splitlines()[0] if out else ""
    for word in first.split():
        if word[:1].isdigit():
            return tuple(int(p) for p in word.split(".")[:3] if p.isdigit())
    raise ValueError(f"cannot read rsync's version from {first!r}")
