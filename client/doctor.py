"""The client half of ``bakgrab doctor``: sshd and rrsync, the capability
that lets the one-shot sshd read every file, and a login account sshd accepts."""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator

from bakgrab.tasks import caps
from bakgrab.tasks.doctor import Check, capabilities, programs


def checks(user: str | None, storage_dir: str | None) -> Iterator[Check]:
    yield from programs(["sshd", "rrsync"])
    yield from capabilities("client", caps.CLIENT_CAPS, "warn")
    yield from account(user or pwd.getpwuid(os.getuid()).pw_name)


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
