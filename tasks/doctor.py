"""``bakgrab doctor``: check that a host can play its role, and say how to fix it.

Each check gives ``ok``, ``warn`` or ``FAIL`` with a one-line detail. The
checks read the system only; they change nothing.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from tasks import caps

Check = tuple[str, str, str]
"""(status, what, detail)"""


def programs(role: str) -> Iterator[Check]:
    needed = ["rsync", "ssh", "ionice", "setpriv"]
    if role in ("client", "both"):
        needed += ["sshd", "rrsync"]
    for name in needed:
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
        yield ("ok", name, path) if path else (
            "FAIL", name, "not found: apt-get install rsync openssh-client openssh-server "
                          "util-linux")
    try:
        version = caps.rsync_version()
    except Exception as e:  # noqa: BLE001 -- reported, not raised
        yield "FAIL", "rsync version", str(e)
        return
    text = ".".join(map(str, version))
    if version < caps.MIN_RSYNC:
        yield "FAIL", "rsync version", f"{text} < 3.4: upgrade rsync (security fixes)"
    else:
        yield "ok", "rsync version", text


def capabilities(role: str) -> Iterator[Check]:
    if os.geteuid() == 0:
        yield "ok", "privileges", "running as root (capabilities not needed)"
        return
    for side, wanted in (("worker", caps.WORKER_CAPS), ("client", caps.CLIENT_CAPS)):
        if role not in (side, "both"):
            continue
        missing = caps.missing_ambient(wanted)
        if missing:
            level = "FAIL" if side == "worker" else "warn"
            yield level, f"{side} capabilities", (
                f"missing {', '.join(missing)}; " + caps.how_to_grant(wanted))
        else:
            yield "ok", f"{side} capabilities", ", ".join(wanted) + " (ambient)"
    extra = set(caps.names_in(caps.sets().get("amb", 0))) - set(
        (caps.WORKER_CAPS if role != "client" else ()) + caps.CLIENT_CAPS)
    if extra:
        yield "warn", "extra capabilities", f"also holds {', '.join(sorted(extra))}: not needed"


def account(user: str) -> Iterator[Check]:
    """sshd (without PAM) refuses a locked account ('!' in shadow) and one
    whose shell cannot run the gate."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        yield "FAIL", "account", f"no user {user}"
        return
    if entry.pw_shell.endswith(("nologin", "false")):
        yield "FAIL", "login shell", (f"{user} has {entry.pw_shell}; sshd runs the gate through "
                                      "the login shell: usermod -s /bin/sh " + user)
    else:
        yield "ok", "login shell", entry.pw_shell
    try:
        with open("/etc/shadow") as f:
            for line in f:
                fields = line.split(":")
                if fields[0] == user:
                    if fields[1].startswith("!"):
                        yield "FAIL", "account lock", (
                            f"{user} is locked ('!'): sshd refuses it; "
                            f"usermod -p '*' {user} (no password, not locked)")
                    else:
                        yield "ok", "account lock", "not locked"
                    return
        yield "warn", "account lock", f"{user} not in /etc/shadow"
    except PermissionError:
        yield "warn", "account lock", "cannot read /etc/shadow (run doctor as root to check)"


def storage(path: Path) -> Iterator[Check]:
    if not path.is_dir():
        yield "FAIL", "storage", f"{path} is not a directory"
        return
    st = path.stat()
    if st.st_uid not in (os.geteuid(), 0):
        yield "warn", "storage owner", f"{path} belongs to uid {st.st_uid}, not to this user"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        yield "FAIL", "storage mode", f"{path} is group/world-writable: chmod go-w {path}"
    else:
        yield "ok", "storage mode", oct(stat.S_IMODE(st.st_mode))
    if not os.access(path, os.W_OK):
        yield "FAIL", "storage access", f"{path} is not writable by this user"
    state = path / ".bakgrab"
    if state.exists() and stat.S_IMODE(state.stat().st_mode) != 0o700:
        yield "FAIL", "state dir", f"{state} must be 0700: chmod 700 {state}"
    free = shutil.disk_usage(path).free
    yield "ok", "storage free", f"{free / (1 << 30):.1f} GiB"


def run(role: str, user: str | None, storage_dir: str | None) -> list[Check]:
    checks = list(programs(role)) + list(capabilities(role))
    if role in ("client", "both"):
        checks += list(account(user or pwd.getpwuid(os.getuid()).pw_name))
    if role in ("worker", "both") and storage_dir:
        checks += list(storage(Path(storage_dir)))
    return checks
