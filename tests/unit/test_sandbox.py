"""bakgrab.worker.sandbox: what a confined child may and may not touch, on the
real kernel (Landlock ABI >= 2 is required here, as by the worker)."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
from pathlib import Path

import pytest

from bakgrab.tasks import process
from bakgrab.tasks.errors import ConfigError
from bakgrab.worker import doctor, sandbox


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for sub in ("dest", "linkdest", "run", "other"):
        (tmp_path / sub).mkdir()
    (tmp_path / "linkdest" / "f").write_bytes(b"old snapshot\n")
    (tmp_path / "other" / "secret").write_bytes(b"another name's file\n")
    (tmp_path / "run" / "key").write_bytes(b"job key\n")
    os.symlink(tmp_path / "other", tmp_path / "linkdest" / "d")
    return tmp_path


def confined(box: sandbox.Sandbox, argv: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    with box.ruleset() as fd, process.spawn(
            argv, cwd=str(cwd), confine=functools.partial(sandbox.enter, fd)) as child:
        out, err = child.popen.communicate(timeout=30)
    return subprocess.CompletedProcess(argv, child.popen.returncode, out, err)


def pull_box(tree: Path, port: int = 22) -> sandbox.Sandbox:
    return sandbox.Sandbox(read=[tree / "run"], link_from=[tree / "linkdest"],
                           write=[tree / "dest"], port=port)


def test_this_kernel_has_what_the_worker_needs() -> None:
    """CI runs on a kernel with Landlock ABI >= 2; the worker needs it."""
    assert sandbox.abi() >= sandbox.MIN_ABI, sandbox.describe()


@pytest.mark.parametrize(("argv", "allowed"), [
    (["cat", "run/key"], True),
    (["cat", "linkdest/f"], True),
    (["ln", "linkdest/f", "dest/f"], True),
    (["touch", "dest/new"], True),
    (["mkdir", "dest/sub"], True),
    (["cat", "linkdest/d/secret"], False),
    (["cat", "other/secret"], False),
    (["ln", "linkdest/d/secret", "dest/stolen"], False),
    (["cp", "linkdest/d/secret", "dest/copied"], False),
    (["touch", "run/new"], False),
    (["touch", "linkdest/new"], False),
    (["rm", "linkdest/f"], False),
    (["cat", "/etc/shadow"], False),
    (["ls", "/root"], False),
])
def test_pull_confinement(tree: Path, argv: list[str], allowed: bool) -> None:
    """A pull's rsync reads its run dir, links out of the link-dest snapshot
    and writes its in-progress dir; the symlink a client stored leads it
    nowhere, and the rest of the host is closed."""
    done = confined(pull_box(tree), argv, tree)
    assert (done.returncode == 0) is allowed, done.stderr
    if not allowed:
        assert b"denied" in done.stderr or b"cross-device" in done.stderr, done.stderr


def test_programs_still_run(tree: Path) -> None:
    """rsync, ssh and setpriv start and find their libraries and config."""
    for argv in (["rsync", "--version"], ["ssh", "-V"], ["setpriv", "--dump"]):
        assert confined(pull_box(tree), argv, tree).returncode == 0, argv


def test_a_local_rsync_copy_inside_the_sandbox(tree: Path) -> None:
    """A real rsync with --link-dest under the sandbox links the unchanged
    file and copies nothing from outside."""
    src = tree / "dest" / "src"
    src.mkdir()
    (src / "f").write_bytes(b"old snapshot\n")
    os.utime(src / "f", ns=(0, (tree / "linkdest" / "f").stat().st_mtime_ns))
    out = tree / "dest" / "out"
    done = confined(pull_box(tree), ["rsync", "-a", f"--link-dest={tree / 'linkdest'}",
                                     f"{src}/", f"{out}/"], tree)
    assert done.returncode == 0, done.stderr
    assert (out / "f").stat().st_ino == (tree / "linkdest" / "f").stat().st_ino


def test_only_the_requests_port(tree: Path) -> None:
    """Where the kernel has network rules (ABI >= 4), the child connects only
    to the request's port."""
    if sandbox.abi() < 4:
        pytest.fail(f"this kernel has {sandbox.describe()}: CI's kernel has network rules")
    with socket.socket() as good, socket.socket() as bad:
        for s in (good, bad):
            s.bind(("127.0.0.1", 0))
            s.listen(4)
        allowed, other = good.getsockname()[1], bad.getsockname()[1]
        box = pull_box(tree, port=allowed)
        for port, ok in ((allowed, True), (other, False)):
            done = confined(box, ["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"], tree)
            assert (done.returncode == 0) is ok, (port, done.stderr)


def test_without_landlock_the_worker_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a kernel without Landlock (or ABI < 2) the worker will not start
    unless sandbox = off, and doctor says FAIL with what to do."""
    monkeypatch.setattr(sandbox, "abi", lambda: 1)
    with pytest.raises(ConfigError, match='sandbox = "off"'):
        sandbox.check_available("landlock")
    assert sandbox.check_available("off") == "off"
    lines = list(doctor.rsync_sandbox(None))
    assert lines[0][0] == "FAIL" and "refuses to start" in lines[0][2]
    with pytest.raises(ConfigError, match="cannot confine rsync"), pull_box(Path("/")).ruleset():
        pass


def test_storage_inside_a_system_tree_is_refused() -> None:
    with pytest.raises(ConfigError, match="lies inside /usr"):
        sandbox.check_storage(Path("/usr/local/backups"))
    sandbox.check_storage(Path("/srv/bakgrab"))
