"""``bakgrab restore``: get files back the same safe way a backup is made.

Like a backup in reverse: the client serves a *staging* directory through a
one-shot sshd whose gate lets through only a write-only rsync receiver
(``rrsync -wo -no-del DIR``), and the worker pushes the selected paths of a
snapshot into it. Nothing outside the staging directory can be written, so a
compromised backup host cannot overwrite live files; the worker only pushes
to the host whose sshd key is pinned for the name.
"""

from __future__ import annotations

from typing import Any

from client.backup import BackupOptions, Reporter, Session, submit
from tasks import RESTORE
from tasks.config import Settings
from tasks.errors import ClientSetupError
from tasks.request import RestoreRequest, check_name, check_paths


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

    return submit(opts, settings, RESTORE, "wo", fields, progress)
