"""Fixtures shared by every test: a hermetic environment and real servers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import support


@pytest.fixture(scope="session", autouse=True)
def session_tmpdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """TMPDIR of the whole run, and of every process it starts: a fresh
    ``bakgrab-test-tmp-*`` dir, removed at the end (issue 13: a full run
    left ``pymp-*`` dirs, billiard's, from workers the tests SIGKILL, and
    ``bakgrab-sshd-*`` dirs, from killed clients, in /tmp). Mode 1777 like
    /tmp, so the tests' throwaway users can use it too; removed with
    ``rm --one-file-system``, never into a mount a test left."""
    import subprocess
    import tempfile

    tmp_path_factory.getbasetemp()  # pytest's own dirs stay where they were
    path = Path(tempfile.mkdtemp(prefix="bakgrab-test-tmp-"))
    path.chmod(0o1777)
    saved_env, saved_dir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(path)
    tempfile.tempdir = str(path)  # this process's own temp files too
    try:
        yield path
    finally:
        tempfile.tempdir = saved_dir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=False,
                       timeout=300)


IOPRIO_GET = {"x86_64": 252, "aarch64": 31}
IOPRIO_SET = {"x86_64": 251, "aarch64": 30}


def _ioprio(value: int | None = None) -> int | None:
    """This thread's I/O priority, or set it to ``value``; None where the
    syscall's number is not known here."""
    import ctypes
    import platform

    table = IOPRIO_GET if value is None else IOPRIO_SET
    number = table.get(platform.machine())
    if number is None:
        return None
    arg = ctypes.c_long
    extra = [] if value is None else [arg(value)]
    return int(ctypes.CDLL(None).syscall(arg(number), arg(1), arg(0), *extra))


@pytest.fixture(autouse=True)
def runner_priority() -> Iterator[None]:
    """The test process's CPU and I/O priority, put back after each test: a
    test that runs ``verify`` in this process (tests/unit/test_manifest.py)
    lowers them, as verify does, and every server a later test of the same
    process starts would inherit them (seen under pytest-xdist: a whole
    worker at nice 19, which its priority test then found)."""
    nice, io = os.getpriority(os.PRIO_PROCESS, 0), _ioprio()
    yield
    if os.getpriority(os.PRIO_PROCESS, 0) != nice:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    if io is not None and io >= 0 and _ioprio() != io:
        _ioprio(io)


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No BAKGRAB_* setting leaks in; client state lives in tmp_path."""
    for key in list(os.environ):
        if key.startswith("BAKGRAB_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("BAKGRAB_CONFIG", str(tmp_path / "no-config.toml"))
    (tmp_path / "no-config.toml").write_text("")


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A private redis-server on a free loopback port."""
    proc, url = support.start_redis(tmp_path / "redis")
    yield url
    proc.stop()


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    path = tmp_path / "storage"
    path.mkdir()
    return path


@pytest.fixture
def worker(tmp_path: Path, redis_url: str, storage: Path) -> Iterator[support.Proc]:
    """A real `bakgrab worker` process serving the default queue."""
    proc = support.start_worker(storage, redis_url, tmp_path / "worker.log")
    yield proc
    proc.stop()


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (CI runs as root)")


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temp dir other users can traverse, removed afterwards."""
    path = support.readable_tmp(Path("/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
