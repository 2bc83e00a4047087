"""Fixtures shared by every test: a hermetic environment and real servers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import support


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
