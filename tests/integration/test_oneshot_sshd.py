"""The client's one-shot sshd, driven by real ssh and rsync: read-only, one key,
allowed peers only."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bakgrab.client import keys
from bakgrab.client.sshd import OneShotServer, ServerConfig, parse_allow

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
    assert done.returncode == 255
    assert "Permission denied" in done.stderr
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
    hang = subprocess.Popen([*ssh_cmd(srv.port, key), "-N", "root@127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from tests.support import wait_for

        wait_for(lambda: srv.children, 10, "an sshd child")
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
