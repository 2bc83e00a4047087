"""``bakgrab doctor``: check that a host can play its role, and say how to fix it.

Each check gives ``ok``, ``warn`` or ``FAIL`` with a one-line detail. The
checks read the system only; they change nothing. This module holds what
both roles check; each side adds its own half (``bakgrab.client.doctor``,
``bakgrab.worker.doctor``), found through the ``bakgrab.doctor`` entry points.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping

from bakgrab.tasks import caps

Check = tuple[str, str, str]
"""(status, what, detail)"""

Half = Callable[[str | None, str | None], Iterable[Check]]
"""One side's checks, given the login user and the storage dir (either may be None)."""

INSTALL_HINT = "apt-get install rsync openssh-client openssh-server util-linux"


def programs(names: Iterable[str]) -> Iterator[Check]:
    for name in names:
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
        yield ("ok", name, path) if path else ("FAIL", name, f"not found: {INSTALL_HINT}")


def rsync_version() -> Iterator[Check]:
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


def capabilities(side: str, wanted: tuple[str, ...], level: str) -> Iterator[Check]:
    """Whether this process holds ``wanted`` as ambient capabilities (not
    needed as root); ``level`` is what their absence counts as."""
    if os.geteuid() == 0:
        return
    missing = caps.missing_ambient(wanted)
    if missing:
        yield level, f"{side} capabilities", (
            f"missing {', '.join(missing)}; " + caps.how_to_grant(wanted))
    else:
        yield "ok", f"{side} capabilities", ", ".join(wanted) + " (ambient)"


def extra_capabilities(roles: Iterable[str]) -> Iterator[Check]:
    if os.geteuid() == 0:
        yield "ok", "privileges", "running as root (capabilities not needed)"
        return
    wanted = {"worker": caps.WORKER_CAPS, "client": caps.CLIENT_CAPS}
    allowed = {c for role in roles for c in wanted.get(role, ())}
    extra = set(caps.names_in(caps.sets().get("amb", 0))) - allowed
    if extra:
        yield "warn", "extra capabilities", f"also holds {', '.join(sorted(extra))}: not needed"


def run(role: str, halves: Mapping[str, Half], user: str | None,
        storage_dir: str | None) -> list[Check]:
    """Every check for ``role`` ("both": each side in ``halves``)."""
    if role != "both" and role not in halves:
        return [("FAIL", "role", f"the {role} side of bakgrab is not installed on this host")]
    roles = sorted(halves) if role == "both" else [role]
    checks = list(programs(["rsync", "ssh", "ionice", "setpriv"])) + list(rsync_version())
    checks += list(extra_capabilities(roles))
    for name in roles:
        checks += list(halves[name](user, storage_dir))
    return checks
