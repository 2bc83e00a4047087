"""``bakgrab restore``: get files back the same safe way a backup is made.

Like a backup in reverse: the client serves a *staging* directory through a
one-shot sshd whose gate lets through only a write-only rsync receiver
(``rrsync -wo -no-del DIR``), and the worker pushes the selected paths of a
snapshot into it. Nothing outside the staging directory can be written, so a
compromised backup host cannot overwrite live files; the worker only pushes
to the host whose sshd key is pinned for the name. Device nodes and FIFOs,
which rrsync -wo does not create, come as a list in the result and are made
here, inside the staging dir only (device nodes only in a 0700 staging dir).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

from bakgrab.client.backup import BackupOptions, Reporter, Session, submit
from bakgrab.tasks import RESTORE
from bakgrab.tasks.config import Settings
from bakgrab.tasks.errors import BakgrabError, ClientSetupError
from bakgrab.tasks.request import RestoreRequest, check_name, check_paths

log = logging.getLogger(__name__)


def restore(opts: BackupOptions, settings: Settings, snapshot: str, paths: list[str],
            progress: Reporter | None = None) -> dict[str, Any]:
    """Restore ``paths`` of ``snapshot`` of ``opts.name`` into ``opts.source``."""
    name = check_name(opts.name)
    wanted = check_paths(paths)
    if not opts.source.is_dir():
        raise ClientSetupError(f"--into {opts.source}: not a directory (create it first)")

    def fields(s: Session) -> dict[str, Any]:
        return RestoreRequest(name=name, snapshot=snapshot, paths=wanted, address=s.address,
                              port=s.port, user=s.user, key=s.key,
                              host_key=s.host_key).to_wire()

    # judged before the restore: restoring "." gives the dir the snapshot's mode
    private = stat.S_IMODE(os.stat(opts.source).st_mode) & 0o077 == 0
    result = submit(opts, settings, RESTORE, "wo", fields, progress)
    made, skipped = recreate_specials(opts.source, result.pop("specials", []), private)
    result["specials_created"] = made
    result["specials_skipped"] = skipped
    if skipped:
        result["partial"] = True
    return result


def set_xattrs(path: str, xattrs: dict[str, str]) -> None:
    """Exactly ``xattrs`` (base64 values) on ``path``: a default ACL of the
    parent may have given the new node one it did not have."""
    import base64

    for name in os.listxattr(path, follow_symlinks=False):
        if name not in xattrs:
            os.removexattr(path, name, follow_symlinks=False)
    for name, value in xattrs.items():
        os.setxattr(path, str(name), base64.b64decode(value), follow_symlinks=False)


def recreate_specials(staging: Path, entries: Any, private: bool) -> tuple[int, list[str]]:
    """Make the device nodes and FIFOs the worker listed, inside ``staging``
    only: each parent must resolve inside it, the name must not exist yet.
    Device nodes are made only in a staging dir no other user can enter (a
    node could otherwise open a raw device to them)."""
    if not isinstance(entries, list):
        return 0, []
    root = os.path.realpath(staging)
    made, skipped = 0, []
    for entry in entries:
        try:
            rel = check_paths([entry["path"]])[0]
            mode, uid, gid = int(entry["mode"]), int(entry["uid"]), int(entry["gid"])
            kind = stat.S_IFMT(mode)
            if kind not in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO) or rel == ".":
                raise ValueError("not a device node or FIFO")
            if kind != stat.S_IFIFO and not private:
                raise ValueError(f"device node, and {staging} is open to other users "
                                 "(chmod 700 it)")
            parent = os.path.realpath(os.path.join(root, os.path.dirname(rel)))
            if parent != root and not parent.startswith(root + os.sep):
                raise ValueError("its parent leads outside the staging dir")
            name = os.path.basename(rel)
            fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                before = os.fstat(fd)
                rdev = os.makedev(int(entry["major"]), int(entry["minor"]))
                os.mknod(name, stat.S_IMODE(mode) | kind, rdev, dir_fd=fd)
                os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
                os.chmod(name, stat.S_IMODE(mode), dir_fd=fd)  # after chown: keeps setgid etc.
                set_xattrs(f"/proc/self/fd/{fd}/{name}", entry.get("xattrs") or {})
                ns = int(entry["mtime_ns"])
                os.utime(name, ns=(ns, ns), dir_fd=fd, follow_symlinks=False)
                # the new entry touched its parent: give it back rsync's times
                os.utime(fd, ns=(before.st_atime_ns, before.st_mtime_ns))
            finally:
                os.close(fd)
            made += 1
        except (OSError, ValueError, KeyError, TypeError, BakgrabError) as e:
            path = entry.get("path") if isinstance(entry, dict) else None
            log.warning("not recreated: %r: %s", path, e)
            skipped.append(str(path)[:4096])
    return made, skipped
