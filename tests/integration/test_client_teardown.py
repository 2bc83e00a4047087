"""The client ends promptly and cleanly, whatever stops it (issue 13).

* ``backup --to A --to B`` stopped by SIGTERM or Ctrl-C: the jobs run in
  threads, and the signal must end the process as promptly as with one
  target, each job torn down (its sshd killed, its port closed, its temp dir
  removed, its job revoked);
* a tunnel whose ssh never becomes ready (an "sshd" that sends its version
  and then nothing) is given up at its deadline, with its ssh killed;
* a corrupt host key file is a set-up error (exit 10, never 1, the code of
  a partial snapshot) in one line; the traceback only with ``--debug``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bakgrab.client.tunnel import READY_GRACE, Tunnel
from bakgrab.tasks.errors import ClientSetupError
from tests import support
from tests.support import alive, comm, descendants

pytestmark = pytest.mark.integration

SSH_OPTIONS = ("UserKnownHostsFile=/dev/null", "StrictHostKeyChecking=no")
"""The fake sshd below has no host key to check."""


def exited_within(pid: int, timeout: float) -> bool:
    """Whether ``pid`` (our child) exits within ``timeout``, leaving it
    unreaped: a zombie keeps its pid, so what is checked next is about it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(0.02)
    return False


def stopped_worker(proc: support.Proc) -> contextlib.AbstractContextManager[None]:
    """The worker's whole process group SIGSTOPped: it takes no job."""

    @contextlib.contextmanager
    def stopped() -> Iterator[None]:
        os.killpg(proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(proc.pid, signal.SIGCONT)

    return stopped()


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_ends_a_multi_target_backup_at_once(tmp_path: Path, sig: int, code: int) -> None:
    """Two backup hosts, one pulling slowly and one stopped (its job stays
    queued): SIGTERM or SIGINT ends `bakgrab backup --to A --to B` within a
    few seconds with 128+n; when it has exited (checked before it is
    reaped) neither one-shot sshd accepts on its port, no sshd of it is
    alive, its temp dirs are gone (only an orderly teardown removes them),
    and the running job was revoked."""
    with contextlib.ExitStack() as stack:
        procs: list[support.Proc] = []

        def stop_all() -> None:
            for proc in reversed(procs):
                proc.stop()

        stack.callback(stop_all)
        redis_a, url_a = support.start_redis(tmp_path / "redis-a")
        procs.append(redis_a)
        redis_b, url_b = support.start_redis(tmp_path / "redis-b")
        procs.append(redis_b)
        worker_a = support.start_worker(tmp_path / "storage-a", url_a, tmp_path / "worker-a.log",
                                        env=support.worker_env(bwlimit="100K"))
        procs.append(worker_a)
        worker_b = support.start_worker(tmp_path / "storage-b", url_b, tmp_path / "worker-b.log")
        procs.append(worker_b)
        stack.enter_context(stopped_worker(worker_b))

        src = tmp_path / "src"
        src.mkdir()
        (src / "big").write_bytes(os.urandom(8 << 20))
        tmpdir = tmp_path / "client-tmp"
        tmpdir.mkdir()
        err_path = tmp_path / "client.err"
        err = stack.enter_context(open(err_path, "wb"))
        client = subprocess.Popen(
            [support.BAKGRAB, "--debug", "backup", "--name", "multi", "--source", str(src),
             "--to", f"broker={url_a}", "--to", f"broker={url_b}"],
            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
            env={**os.environ, "TMPDIR": str(tmpdir)})

        def stop_client() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(client.pid, signal.SIGKILL)
            client.wait(10)

        stack.callback(stop_client)
        sshd_pids: set[int] = set()

        def both_sent_and_pulling() -> bool:
            sshd_pids.update(p for p in descendants(client.pid) if comm(p) == "sshd")
            text = err_path.read_text(errors="replace")
            return (text.count("sent bakgrab.grab") == 2 and bool(sshd_pids)
                    and any(comm(p) == "rsync" for p in descendants(worker_a.pid)))

        support.wait_for(both_sent_and_pulling, 60, "both jobs sent and A's pull running")
        ports = [int(p) for p in re.findall(r"one-shot sshd listening on \S+ port (\d+)",
                                            err_path.read_text(errors="replace"))]
        assert len(ports) == 2 and all(support.port_open(p) for p in ports)
        assert len(list(tmpdir.glob("bakgrab-sshd-*"))) == 2
        sshd_pids.update(p for p in descendants(client.pid) if comm(p) == "sshd")

        sent = time.monotonic()
        client.send_signal(sig)
        assert exited_within(client.pid, 10), "the client did not exit within 10s of the signal"
        took = time.monotonic() - sent
        # the client has exited and is not reaped yet: nothing of it serves
        assert [p for p in ports if support.port_open(p)] == []
        assert [(p, comm(p)) for p in sshd_pids if alive(p)] == []
        assert list(tmpdir.iterdir()) == []
        client.wait(5)
        text = err_path.read_text(errors="replace")
        assert client.returncode == code, text[-2000:]
        assert "Traceback" not in text, text[-2000:]
        if sig == signal.SIGINT:
            assert "bakgrab: interrupted" in text
        assert took < 10
        # the job that was running was revoked and its pull stopped
        support.wait_for(lambda: "revoked" in worker_a.text().lower(), 30, "the revoke")
        support.wait_for(lambda: not any(comm(p) == "rsync" for p in descendants(worker_a.pid)),
                         30, "worker A's rsync to end")
        assert support.snapshots(tmp_path / "storage-a", "multi") == []


def test_multi_target_reports_each_outcome_and_a_failure_wins(
    tmp_path: Path, redis_url: str, storage: Path, worker: support.Proc
) -> None:
    """Without a signal, every job ends by itself and is reported: one backup
    host works, the other's broker is not there; the run exits with the
    failure's code (10), not 0, and says which target failed."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("data\n")
    nowhere = f"redis://127.0.0.1:{support.free_port()}/0"
    done = subprocess.run(
        [support.BAKGRAB, "backup", "--name", "both", "--source", str(src),
         "--to", f"broker={redis_url}", "--to", f"broker={nowhere}"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 10, done.stderr
    assert f"to {redis_url}: both: snapshot" in done.stdout, done.stdout
    assert f"bakgrab: error: to {nowhere}: " in done.stderr
    assert "Traceback" not in done.stderr
    assert support.rsync_diff(src, support.snapshots(storage, "both")[0]) == []


class FakeSshd:
    """A TCP listener that accepts, says an SSH version (or nothing) and then
    never another byte: ssh waits for the key exchange for ever."""

    def __init__(self, banner: bytes) -> None:
        self.banner = banner
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                if self.banner:
                    conn.sendall(self.banner)
                self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture(params=[b"SSH-2.0-OpenSSH_9.2p1\r\n", b""], ids=["stalls-after-version", "silent"])
def fake_sshd(request: pytest.FixtureRequest) -> Iterator[FakeSshd]:
    fake = FakeSshd(request.param)
    yield fake
    fake.close()


def test_tunnel_that_never_becomes_ready_is_given_up(fake_sshd: FakeSshd) -> None:
    """A real ssh to a server that never completes the handshake: the tunnel
    gives up within connect_timeout + READY_GRACE (plus a little), with a
    ClientSetupError saying so, and its ssh is gone (checked from the thread
    that started it, before that thread ends: ssh's parent-death signal is
    tied to it)."""
    connect_timeout = 2
    outcome: dict[str, object] = {}

    def start() -> None:
        tunnel = Tunnel(f"127.0.0.1:{fake_sshd.port}", "redis://127.0.0.1:6379/0",
                        ssh_options=SSH_OPTIONS, connect_timeout=connect_timeout)
        began = time.monotonic()
        try:
            tunnel.start()
            outcome["result"] = "ready"
        except BaseException as e:
            outcome["result"] = e
        outcome["took"] = time.monotonic() - began
        if tunnel.child is not None:
            outcome["ssh_alive"] = alive(tunnel.child.pid)
        tunnel.close()

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    thread.join(connect_timeout + READY_GRACE + 10)
    assert not thread.is_alive(), "Tunnel.start() did not return"
    assert fake_sshd.accepted, "ssh never connected to the fake sshd"
    error = outcome["result"]
    assert isinstance(error, ClientSetupError), error
    assert float(outcome["took"]) < connect_timeout + READY_GRACE + 3  # type: ignore[arg-type]
    assert outcome["ssh_alive"] is False
    assert f"127.0.0.1 port {fake_sshd.port}" in str(error)
    if fake_sshd.banner:
        assert f"not ready within {connect_timeout + READY_GRACE}s" in str(error)
    else:  # ssh gave up by itself (ConnectTimeout covers the version exchange)
        assert "banner exchange" in str(error)


def test_tunnel_start_stops_when_its_check_raises() -> None:
    """A multi-target run being stopped reaches a tunnel that is still
    starting through its ``check``: start() raises what check raised at once
    (long before the readiness deadline) and its ssh is gone, checked from
    the thread that started it."""
    fake = FakeSshd(b"SSH-2.0-OpenSSH_9.2p1\r\n")
    outcome: dict[str, object] = {}
    stop_at = time.monotonic() + 1.0

    def check() -> None:
        if time.monotonic() >= stop_at:
            raise KeyboardInterrupt

    def start() -> None:
        tunnel = Tunnel(f"127.0.0.1:{fake.port}", "redis://127.0.0.1:6379/0",
                        ssh_options=SSH_OPTIONS, connect_timeout=20, check=check)
        try:
            with tunnel:
                outcome["result"] = "ready"
        except BaseException as e:
            outcome["result"] = e
        outcome["took"] = time.monotonic() - (stop_at - 1.0)
        outcome["ssh_alive"] = tunnel.child is not None and alive(tunnel.child.pid)

    try:
        thread = threading.Thread(target=start, daemon=True)
        thread.start()
        thread.join(20)
        assert not thread.is_alive(), "Tunnel.start() did not return"
    finally:
        fake.close()
    assert fake.accepted, "ssh never connected to the fake sshd"
    assert isinstance(outcome["result"], KeyboardInterrupt), outcome
    assert float(outcome["took"]) < 5  # type: ignore[arg-type]
    assert outcome["ssh_alive"] is False


def test_backup_through_a_tunnel_that_never_becomes_ready(tmp_path: Path) -> None:
    """`bakgrab backup --tunnel` to a server that stalls after its version:
    exit 10 within the deadline, one line saying the tunnel was not ready,
    no traceback, no temp dir left."""
    fake = FakeSshd(b"SSH-2.0-OpenSSH_9.2p1\r\n")
    try:
        src = tmp_path / "src"
        src.mkdir()
        tmpdir = tmp_path / "client-tmp"
        tmpdir.mkdir()
        env = {**os.environ, "TMPDIR": str(tmpdir), "BAKGRAB_CONNECT_TIMEOUT": "2"}
        began = time.monotonic()
        done = subprocess.run(
            [support.BAKGRAB, "backup", "--name", "stall", "--source", str(src),
             "--tunnel", f"127.0.0.1:{fake.port}",
             *[arg for opt in SSH_OPTIONS for arg in ("--ssh-option", opt)]],
            capture_output=True, text=True, timeout=60, env=env)
        took = time.monotonic() - began
    finally:
        fake.close()
    assert done.returncode == 10, done.stderr
    assert took < 2 + READY_GRACE + 10
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bakgrab: error: SSH tunnel"), done.stderr
    assert f"not ready within {2 + READY_GRACE}s" in lines[0]
    assert list(tmpdir.iterdir()) == []


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_corrupt_host_key_is_one_line_naming_the_file(tmp_path: Path, debug: bool) -> None:
    """A corrupt host key file in the client's state dir (its identity) is a
    set-up error (exit 10) in one line naming the file and what to do, never a
    new key made silently; the traceback appears only with --debug. (Errors
    bakgrab did not foresee exit 70: tests/unit/test_cli_errors.py.)"""
    state = tmp_path / "state"
    (state / "bakgrab").mkdir(parents=True)
    key = state / "bakgrab" / "ssh_host_ed25519_key"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\ngarbage\n")
    key.chmod(0o600)
    src = tmp_path / "src"
    src.mkdir()
    env = {**os.environ, "XDG_STATE_HOME": str(state), "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [support.BAKGRAB, *(["--debug"] if debug else []), "backup", "--name", "corrupt",
         "--source", str(src), "--broker", f"redis://127.0.0.1:{support.free_port()}/0"],
        capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 10, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"bakgrab: error: {key}: not an unencrypted OpenSSH ed25519"), done.stderr
    assert "bakgrab trust NAME --key" in last
    assert key.read_text() == "-----BEGIN OPENSSH PRIVATE KEY-----\ngarbage\n"
    if debug:
        assert "Traceback (most recent call last)" in done.stderr
    else:
        assert done.stderr.count("\n") == 1, done.stderr
        assert "Traceback" not in done.stderr
    assert list(tmp_path.glob("bakgrab-sshd-*")) == []
