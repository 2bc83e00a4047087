"""The client as a process: unprivileged runs, and teardown on Ctrl-C and SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests import support
from tests.conftest import need_root
from tests.support import alive, comm, descendants

pytestmark = pytest.mark.integration


def test_unprivileged_client_backs_up_its_own_files(
    shared_tmp: Path, redis_url: str, storage: Path, worker: support.Proc
) -> None:
    """Run as an ordinary user, the client's sshd runs as that user and the
    backup of files that user can read is complete and identical."""
    need_root()
    name = "bkg" + secrets.token_hex(3)
    with support.throwaway_user(name, shared_tmp / "home") as user:
        src = shared_tmp / "src"
        (src / "private").mkdir(parents=True)
        (src / "private" / "notes").write_text("mine\n")
        os.chmod(src / "private" / "notes", 0o600)
        os.chmod(src / "private", 0o700)
        state = shared_tmp / "state"
        state.mkdir()
        for path in (src, src / "private", src / "private" / "notes", state):
            os.chown(path, user.pw_uid, user.pw_gid)
        env = {"PATH": os.environ["PATH"], "HOME": str(shared_tmp),
               "XDG_STATE_HOME": str(state), "LANG": "C.UTF-8"}
        done = support.run_backup(redis_url, "unpriv", src, "--json", env=env, user=name)
        assert done.returncode == 0, done.stderr
        snap = support.snapshots(storage, "unpriv")[0]
        assert support.rsync_diff(src, snap) == []
        assert (snap / "private" / "notes").stat().st_uid == user.pw_uid
        meta = json.loads((storage / ".bakgrab" / "meta" / f"{snap.name}.json").read_text())
        assert meta["client"]["user"] == name
        # its sshd host key was made for that user, private
        key = state / "bakgrab" / "ssh_host_ed25519_key"
        assert key.stat().st_uid == user.pw_uid and key.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_client_tears_everything_down(
    tmp_path: Path, redis_url: str, storage: Path, sig: int, code: int
) -> None:
    """Ctrl-C or SIGTERM in the middle of a pull: the client exits with 128+n,
    leaves no sshd behind, the job is revoked, the worker's rsync ends, no
    snapshot appears and the in-progress dir is kept for the next grab."""
    worker = support.start_worker(storage, redis_url, tmp_path / "worker.log",
                                  env=support.worker_env(bwlimit="200K", rsync_timeout="5"))
    try:
        src = tmp_path / "src"
        src.mkdir()
        (src / "big").write_bytes(os.urandom(8 << 20))
        client = subprocess.Popen(
            [support.BAKGRAB, "backup", "--broker", redis_url, "--name", "slow",
             "--source", str(src)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen: set[int] = set()

        def pulling() -> bool:
            seen.update(descendants(client.pid))
            return any(comm(p) == "sshd" for p in seen) and any(
                comm(p) == "rsync" for p in descendants(worker.pid))

        support.wait_for(pulling, 30, "the pull to start")
        time.sleep(1)
        seen.update(descendants(client.pid))
        client.send_signal(sig)
        _, err = client.communicate(timeout=30)
        assert client.returncode == code, err
        assert [(p, comm(p)) for p in seen if alive(p)] == []
        support.wait_for(lambda: not any(comm(p) in ("rsync", "ssh")
                                         for p in descendants(worker.pid)), 30,
                         "the worker's rsync to end")
        support.wait_for(lambda: "revoked" in worker.text().lower(), 30, "the revoke")
        assert support.snapshots(storage, "slow") == []
        assert (storage / ".bakgrab" / "inprogress" / "slow").is_dir()
    finally:
        worker.stop()


def test_progress_on_a_terminal_and_silence_under_cron(
    tmp_path: Path, redis_url: str, storage: Path
) -> None:
    """On a terminal the client shows live progress (bytes, percent, rate,
    files, ETA); without one (cron) a successful backup prints nothing on
    stderr and only the summary line on stdout."""
    import pty

    worker = support.start_worker(storage, redis_url, tmp_path / "worker.log",
                                  env=support.worker_env(bwlimit="300K"))
    try:
        src = tmp_path / "src"
        src.mkdir()
        for i in range(6):
            (src / f"f{i}").write_bytes(os.urandom(200_000))
        master, slave = pty.openpty()
        client = subprocess.Popen(
            [support.BAKGRAB, "backup", "--broker", redis_url, "--name", "tty",
             "--source", str(src)], stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        client.wait(60)
        os.close(master)
        assert client.returncode == 0
        text = seen.decode(errors="replace")
        assert "ETA" in text and "%" in text and "files" in text, text

        (src / "f0").write_bytes(os.urandom(1000))
        quiet = support.run_backup(redis_url, "tty", src)
        assert quiet.returncode == 0
        assert quiet.stderr == ""
        assert quiet.stdout.count("\n") == 1 and "tty: snapshot" in quiet.stdout
    finally:
        worker.stop()


def test_idle_connections_cannot_stop_the_backup(
    tmp_path: Path, redis_url: str, storage: Path, worker: support.Proc
) -> None:
    """A local user who opens 50 idle TCP connections to the one-shot sshd
    before the backup host connects uses none of the job's sessions: the real
    backup completes, identical, in its normal time (issue 13). The worker is
    held (SIGSTOP) until the 50 connections are open."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(5):
        (src / "d" / f"f{i}").write_bytes(os.urandom(50_000))
    port = support.free_port()
    idle: list[socket.socket] = []
    with contextlib.ExitStack() as stack:
        os.killpg(worker.pid, signal.SIGSTOP)
        held = stack.enter_context(contextlib.ExitStack())
        held.callback(os.killpg, worker.pid, signal.SIGCONT)

        def close_idle() -> None:
            for conn in idle:
                conn.close()

        stack.callback(close_idle)
        client = subprocess.Popen(
            [support.BAKGRAB, "backup", "--broker", redis_url, "--name", "crowded",
             "--source", str(src), "--port", str(port), "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

        def stop_client() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(client.pid, signal.SIGKILL)
            client.wait(10)

        stack.callback(stop_client)

        def connect() -> socket.socket | None:
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=2)
            except OSError:
                return None

        idle.append(support.wait_for(connect, 30, "the one-shot sshd to listen"))
        while len(idle) < 50:
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        began = time.monotonic()
        held.close()  # SIGCONT: the worker takes the job now
        out, err = client.communicate(timeout=120)
        took = time.monotonic() - began
    assert client.returncode == 0, err
    result = json.loads(out)
    assert result["snapshot"].startswith("crowded.")
    assert result["attempts"] == 1  # the first attempt got through: no retry was needed
    assert took < 60, f"the backup took {took:.0f}s"
    snap = support.snapshots(storage, "crowded")[0]
    assert support.rsync_diff(src, snap) == []
