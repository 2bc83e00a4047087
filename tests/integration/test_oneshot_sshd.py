"""The client's one-shot sshd, driven by real ssh and rsync: read-only, one key,
allowed peers only."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bakgrab.client import keys, sshd
from bakgrab.client.sshd import OneShotServer, ServerConfig, parse_allow
from bakgrab.tasks.errors import ClientSetupError
from tests import support

pytestmark = pytest.mark.integration


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath, name)
            st = p.lstat()
            h.update(f"{p.relative_to(root)} {st.st_mode} {st.st_size} {st.st_mtime_ns}".encode())
            if p.is_file() and not p.is_symlink():
                h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[OneShotServer, Path, Path]]:
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "dir" / "file").write_text("client data\n")
    key = keys.one_time_key()
    key_file = tmp_path / "key"
    key_file.write_text(key.private)
    key_file.chmod(0o600)
    host_key, _ = keys.host_key(tmp_path / "state")
    srv = OneShotServer(ServerConfig(
        source=src, public_key=key.public, allow=parse_allow("127.0.0.1"),
        host_key=host_key, listen="127.0.0.1", max_connections=20,
    ))
    srv.start()
    yield srv, src, key_file
    srv.close()


def ssh_cmd(port: int, key: Path, *extra: str) -> list[str]:
    return ["ssh", "-F", "/dev/null", "-p", str(port), "-i", str(key), "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", *extra]


def rsync(port: int, key: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rsync", "-e", " ".join(ssh_cmd(port, key)), *args],
                          capture_output=True, text=True, timeout=60)


def test_read_only_pull_works(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The one-time key pulls the source tree read-only."""
    srv, src, key = server
    out = tmp_path / "out"
    done = rsync(srv.port, key, "-a", "root@127.0.0.1:/", f"{out}/")
    assert done.returncode == 0, done.stderr
    assert (out / "dir" / "file").read_text() == "client data\n"


@pytest.mark.parametrize("args", [
    ["{upload}", "root@127.0.0.1:/"],
    ["{upload}", "root@127.0.0.1:/dir/"],
    ["-a", "--remove-source-files", "root@127.0.0.1:/dir/file", "{out}/"],
    ["-a", "--delete", "{upload_dir}/", "root@127.0.0.1:/dir/"],
])
def test_writes_through_the_gate_are_refused(server, tmp_path: Path, args) -> None:  # type: ignore[no-untyped-def]
    """Uploads and source-removing pulls are refused; the client's tree is unchanged."""
    srv, src, key = server
    before = tree_digest(src)
    upload = tmp_path / "upload"
    upload.write_text("evil\n")
    (tmp_path / "updir").mkdir()
    argv = [a.format(upload=upload, out=tmp_path / "out", upload_dir=tmp_path / "updir")
            for a in args]
    done = rsync(srv.port, key, *argv)
    assert done.returncode != 0
    assert tree_digest(src) == before
    assert (src / "dir" / "file").exists()


def test_shell_and_other_commands_are_refused(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A shell, another command or a tty gets nothing."""
    srv, src, key = server
    before = tree_digest(src)
    for command in (["id"], ["sh", "-c", "touch /tmp/x"], [f"touch {src}/pwned"], []):
        done = subprocess.run([*ssh_cmd(srv.port, key), "-T", "root@127.0.0.1", *command],
                              capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert done.returncode != 0
        assert "uid=" not in done.stdout
    assert tree_digest(src) == before
    assert "refused" in srv.gate_log.read_text()


def test_wrong_key_is_refused(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A connection with any other key is refused by sshd."""
    srv, src, _ = server
    other = tmp_path / "other"
    other.write_text(keys.one_time_key().private)
    other.chmod(0o600)
    done = rsync(srv.port, other, "-a", "root@127.0.0.1:/", f"{tmp_path / 'out'}/")
    # rsync reports ssh's 255, or 12 when it sees the stream close first (a race in rsync)
    assert done.returncode in (12, 255), done.stderr
    assert "Permission denied (publickey)" in done.stderr
    assert not (tmp_path / "out" / "dir").exists()


def test_peer_outside_allow_list_is_refused_before_sshd(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A peer whose address is not allowed is dropped before any sshd starts."""
    srv, src, key = server
    served = srv.served
    done = subprocess.run([*ssh_cmd(srv.port, key, "-b", "127.0.0.2"), "root@127.0.0.1", "true"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 255
    assert srv.served == served
    assert srv.refused == ["127.0.0.2"]


def test_close_kills_every_sshd_and_removes_files(tmp_path: Path) -> None:
    """Closing the server kills the sshd it started, even mid-session."""
    src = tmp_path / "src"
    src.mkdir()
    key = keys.one_time_key()
    key_file = tmp_path / "key"
    key_file.write_text(key.private)
    key_file.chmod(0o600)
    host_key, _ = keys.host_key(tmp_path / "state")
    srv = OneShotServer(ServerConfig(source=src, public_key=key.public,
                                     allow=parse_allow("127.0.0.1"), host_key=host_key,
                                     listen="127.0.0.1"))
    srv.start()
    # An ssh that authenticates and then hangs in a refused-session state.
    hang = subprocess.Popen([*ssh_cmd(srv.port, key_file), "-N", "root@127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from tests.support import wait_for

        wait_for(lambda: srv.sessions == 1, 10, "the ssh to authenticate")
        pids = [c.pid for c in srv.children]
        workdir = srv.workdir
        srv.close()
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(
                f"/proc/{pid}/stat").read_text().split()[2]
        assert not workdir.exists()
    finally:
        hang.kill()
        hang.wait()


def make_server(tmp_path: Path, **kw: object) -> tuple[OneShotServer, Path]:
    """A server (not started) for a fresh source, and the one-time key's file."""
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True, exist_ok=True)
    (src / "dir" / "file").write_text("client data\n")
    key = keys.one_time_key()
    key_file = tmp_path / "key"
    key_file.write_text(key.private)
    key_file.chmod(0o600)
    host_key, _ = keys.host_key(tmp_path / "state")
    cfg = {"source": src, "public_key": key.public, "allow": parse_allow("127.0.0.1"),
           "host_key": host_key, "listen": "127.0.0.1", **kw}
    return OneShotServer(ServerConfig(**cfg)), key_file  # type: ignore[arg-type]


@pytest.fixture
def private_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tempfile's dir for this test only: what the server leaves there is its own."""
    path = tmp_path / "tmpdir"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


@pytest.mark.parametrize("breakage", ["port in use", "host key unusable", "source missing"])
def test_failed_start_leaves_no_temp_dir(tmp_path: Path, private_tmpdir: Path,
                                         breakage: str) -> None:
    """A start that fails (the port is taken, sshd refuses the generated
    config, no source) raises a ClientSetupError and removes its
    bakgrab-sshd-* dir (issue 13)."""
    with contextlib.ExitStack() as stack:
        kw: dict[str, object] = {}
        if breakage == "port in use":
            taken = stack.enter_context(socket.socket())
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            kw["port"] = taken.getsockname()[1]
        srv, _ = make_server(tmp_path, **kw)
        if breakage == "host key unusable":
            srv.cfg.host_key = tmp_path / "garbage-key"
            srv.cfg.host_key.write_text("not a key\n")
            srv.cfg.host_key.chmod(0o600)
        if breakage == "source missing":
            srv.cfg.source = tmp_path / "nowhere"
        assert [p.name for p in private_tmpdir.iterdir()] == [srv.workdir.name]
        with pytest.raises(ClientSetupError) as info:
            srv.start()
        assert list(private_tmpdir.iterdir()) == []
        if breakage == "host key unusable":
            assert "sshd refuses the one-shot server's configuration" in str(info.value)
        # closing it again changes nothing and raises nothing
        srv.close()


def pull(port: int, key: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """A real pull of the source's dir/ with the one-time key."""
    return subprocess.run(
        ["rsync", "-e", " ".join(ssh_cmd(port, key, "-o", "ConnectTimeout=10")), "-a",
         "root@127.0.0.1:/dir/", f"{out}/"], capture_output=True, text=True, timeout=60)


def test_idle_connections_use_no_session_and_are_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 connections that never say a word start no sshd and use none of
    the job's sessions: with an allowance of 2, two real pulls still succeed
    while they are open, and a third is refused. The server drops each
    silent connection after SILENT_WAIT (issue 13)."""
    monkeypatch.setattr(sshd, "SILENT_WAIT", 3.0)
    srv, key = make_server(tmp_path, max_connections=2)
    srv.start()
    idle: list[socket.socket] = []
    try:
        opened = time.monotonic()
        for _ in range(50):
            idle.append(socket.create_connection(("127.0.0.1", srv.port), timeout=5))
        for n in (1, 2):
            done = pull(srv.port, key, tmp_path / f"out{n}")
            assert done.returncode == 0, done.stderr
            assert (tmp_path / f"out{n}" / "file").read_text() == "client data\n"
        # counted as the server sees each authenticate (it looks about once a second)
        support.wait_for(lambda: srv.sessions == 2, 10, "two sessions counted")
        assert srv.served == 2
        third = pull(srv.port, key, tmp_path / "out3")
        assert third.returncode != 0
        assert not (tmp_path / "out3" / "file").exists()
        # while the server still runs, each silent connection is closed by it
        for conn in idle:
            conn.settimeout(max(0.1, opened + 3.0 + 10 - time.monotonic()))
            assert conn.recv(1) == b""
        assert srv.dropped == 50 and srv.served == 2
    finally:
        for conn in idle:
            conn.close()
        srv.close()


def test_stalled_handshakes_cannot_block_the_backup_host(tmp_path: Path) -> None:
    """Connections that send an SSH version and then stall each get an sshd,
    but at most MAX_AUTHENTICATING at once (a newer one cuts the oldest), and
    none counts as a session: a real pull gets through and is the only
    session counted (issue 13)."""
    srv, key = make_server(tmp_path, max_connections=1)
    srv.start()
    stalled: list[socket.socket] = []
    try:
        for _ in range(20):
            conn = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 stall\r\n")
            stalled.append(conn)
        support.wait_for(lambda: srv.served == 20, 30, "an sshd for each stalled connection")
        running = [c for c in srv.children if c.poll() is None]
        assert len(running) <= sshd.MAX_AUTHENTICATING
        assert srv.sessions == 0
        done = pull(srv.port, key, tmp_path / "out")
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "out" / "file").read_text() == "client data\n"
        support.wait_for(lambda: srv.sessions == 1, 10, "the pull counted as a session")
        assert len([c for c in srv.children if c.poll() is None]) <= sshd.MAX_AUTHENTICATING + 1
    finally:
        for conn in stalled:
            conn.close()
        srv.close()


def test_a_user_name_that_looks_like_a_login_uses_no_session(tmp_path: Path) -> None:
    """A peer without the key that calls itself "Accepted publickey for USER
    from ..." (sshd logs the name it was given) does not count as a session:
    with an allowance of 1, the real pull afterwards gets through."""
    srv, key = make_server(tmp_path, max_connections=1)
    srv.start()
    try:
        other = tmp_path / "other-key"
        other.write_text(keys.one_time_key().private)
        other.chmod(0o600)
        fake = subprocess.run(
            [*ssh_cmd(srv.port, other), "-l", f"Accepted publickey for {srv.user} from 192.0.2.1",
             "127.0.0.1", "true"], capture_output=True, text=True, timeout=30,
            stdin=subprocess.DEVNULL)
        assert fake.returncode == 255
        support.wait_for(lambda: srv.children and srv.children[0].poll() is not None, 10,
                         "the fake's sshd to end")
        assert b"Invalid user Accepted publickey" in (srv.workdir / "sshd-1.log").read_bytes()
        done = pull(srv.port, key, tmp_path / "out")
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "out" / "file").read_text() == "client data\n"
        support.wait_for(lambda: srv.sessions == 1, 10, "the pull counted as the one session")
    finally:
        srv.close()
