"""The client's keys: one-time pairs in memory, one persistent sshd host key."""

from __future__ import annotations

import threading
from pathlib import Path

from bakgrab.client import keys


def test_host_key_made_once_when_many_jobs_start_at_once(tmp_path: Path) -> None:
    """Jobs starting together (backup --to a, --to b) all get the same host key,
    the one on disk, kept 0600."""
    state = tmp_path / "state-dir"
    results: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def make() -> None:
        # A thread's exception would only be printed: keep it, so it fails the test.
        try:
            start.wait(10)
            results.append(keys.host_key(state)[1])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=make) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    path, public = keys.host_key(state)
    assert len(results) == 16 and set(results) == {public}
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in state.iterdir()] == [path.name]


def test_one_time_keys_differ_and_private_half_is_not_in_repr() -> None:
    """Each one-time key is new; its repr never shows the private half."""
    a, b = keys.one_time_key(), keys.one_time_key()
    assert a.public != b.public
    assert "PRIVATE" not in repr(a)
