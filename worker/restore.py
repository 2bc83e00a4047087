"""One restore: push paths of a snapshot into the client's staging directory.

Invariants: a restore goes only to the client registered for the name, on
a request signed by its key (it would otherwise hand a backup to whoever
asks; issue 11); it never registers anything; every
path must lie inside the snapshot without passing through a symlink (a
snapshot is the client's data and may hold symlinks pointing anywhere on the
backup host); symlinks themselves are sent as symlinks, never followed. A restore where
files vanished (rsync exit 24) or could not be read or written (23) says so
in its result (``partial``, ``warnings``): never a plain success (issue 12).
What the client's staging dir receives is the client's gate's decision, not
the worker's: it forces an unprivileged receiver unless the dir is private.
"""

from __future__ import annotations

import base64
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

from bakgrab.tasks import RESTORE, caps
from bakgrab.tasks.config import Settings
from bakgrab.tasks.errors import InvalidRequest
from bakgrab.tasks.request import GrabRequest, RestoreRequest
from bakgrab.worker import grab, locks, rsync
from bakgrab.worker.names import check_request
from bakgrab.worker.storage import Snapshot, Storage

log = logging.getLogger(__name__)


def check_requester(storage: Storage, settings: Settings, task_id: str,
                    request: RestoreRequest) -> None:
    """Only the name's registered client gets a restore (issue 11): signed by
    the registered key, fresh, to an address its registration allows. A name
    with no registration gets none, whatever ``enrol`` says."""
    check_request(storage, settings, RESTORE, task_id, request)


def find_snapshot(storage: Storage, request: RestoreRequest) -> Snapshot:
    snaps = storage.snapshots(request.name)
    if not snaps:
        raise InvalidRequest(f"{request.name}: there is no snapshot to restore from")
    if request.snapshot == "latest":
        return snaps[-1]
    for snap in snaps:
        if snap.dirname == request.snapshot:
            return snap
    raise InvalidRequest(f"snapshot {request.snapshot} does not exist")


def inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def check_paths(root: str, paths: tuple[str, ...]) -> None:
    """Each path exists in the snapshot and its parents are real dirs in it."""
    for path in paths:
        target = os.path.join(root, path)
        parent = os.path.dirname(target) if path != "." else root
        if not inside(root, os.path.realpath(parent)):
            raise InvalidRequest(f"paths: {path!r} leads outside the snapshot (a symlink)")
        if not os.path.lexists(target):
            raise InvalidRequest(f"paths: {path!r} is not in the snapshot")


def restore(storage: Storage, settings: Settings, request: RestoreRequest, task_id: str,
            on_progress: grab.ProgressFn = lambda info: None) -> dict[str, Any]:
    task_id = grab.check_task_id(task_id)
    storage.prepare()
    check_requester(storage, settings, task_id, request)
    grab.check_watched(settings, task_id, request.name)
    snap = find_snapshot(storage, request)
    with caps.raised("dac_override"):  # the snapshot's dirs belong to the client's users
        root = os.path.realpath(storage.root / snap.dirname)
        check_paths(root, request.paths)
        found = specials(root, request.paths)
    started = time.time()
    # job_files wants a grab request: the same key and host key, no excludes
    as_grab = GrabRequest(name=request.name, address=request.address, port=request.port,
                          user=request.user, key=request.key, host_key=request.host_key)
    slots = storage.client_slots(request.host_key, settings.max_jobs_per_client)
    with locks.one_of(slots, what=f"the client of {request.name}"), \
            grab.job_files(storage, task_id, as_grab) as files:
        spec = rsync.PullSpec(
            user=request.user, address=request.address, port=request.port,
            key_file=files["key"], known_hosts=files["known_hosts"],
            host_alias=grab.host_alias(request.name), exclude_file=files["exclude"],
            dest=storage.root, link_dest=None, timeout=settings.rsync_timeout,
            connect_timeout=settings.connect_timeout,
            alive_interval=settings.server_alive_interval, bwlimit=settings.bwlimit)
        on_progress({"phase": "pushing", "snapshot": snap.dirname})
        outcome = grab.run_rsync(rsync.push_argv(spec, Path(root), request.paths), on_progress,
                                 grab.confinement(settings, read=[files["key"].parent, Path(root)],
                                                  port=request.port))
    log.info("restored %d path(s) of %s to %s", len(request.paths), snap.dirname,
             request.address)
    warnings = []
    if outcome.code == rsync.VANISHED:
        warnings.append("some files vanished from the snapshot during the restore "
                        "(rsync exit 24)")
    if outcome.code == rsync.PARTIAL:
        warnings.append("some files could not be read or written (rsync exit 23)"
                        + (f"; {len(outcome.failed_paths)} listed in failed_paths"
                           if outcome.failed_paths else ""))
    if len(found) >= MAX_SPECIALS:
        warnings.append(f"the limit of {MAX_SPECIALS} device nodes and FIFOs was reached: "
                        "any beyond it are not recreated")
    return {
        "name": request.name,
        "snapshot": snap.dirname,
        "paths": list(request.paths),
        "files": outcome.stats.get("files", 0),
        "bytes_transferred": outcome.stats.get("bytes_sent", 0),
        "duration": round(time.time() - started, 3),
        "rsync_exit": outcome.code,
        "partial": bool(warnings),
        "warnings": warnings,
        "failed_paths": outcome.failed_paths,
        "specials": found,
    }


MAX_SPECIALS = 100_000


def specials(root: str, paths: tuple[str, ...]) -> list[dict[str, Any]]:
    """Device nodes and FIFOs under ``paths``: rrsync -wo will not create them
    in its restricted dir (--drop-D), so the client recreates them from this
    list, inside its staging dir only."""
    found: list[dict[str, Any]] = []

    def add(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return  # vanished since rsync listed it: rsync says so (exit 24)
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
            if len(found) >= MAX_SPECIALS:
                return
            found.append({
                "path": os.path.relpath(path, root),
                "mode": st.st_mode,
                "uid": st.st_uid,
                "gid": st.st_gid,
                "major": os.major(st.st_rdev),
                "minor": os.minor(st.st_rdev),
                "mtime_ns": st.st_mtime_ns,
                "xattrs": xattrs_of(path),
            })

    for rel in paths:
        top = os.path.join(root, rel) if rel != "." else root
        if not os.path.isdir(top) or os.path.islink(top):
            add(top)
            continue
        for dirpath, _dirs, names in os.walk(top):
            for name in names:
                add(os.path.join(dirpath, name))
    return found


def xattrs_of(path: str) -> dict[str, str]:
    """The xattrs of ``path`` (not followed), base64; those gone meanwhile left out."""
    out = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except FileNotFoundError:
        return {}
    for name in names:
        try:
            out[name] = base64.b64encode(os.getxattr(path, name, follow_symlinks=False)).decode()
        except OSError:
            continue
    return out
